"""LightningModules (training) and the callbacks they need."""

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.callbacks import SavePretrained
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.nonfinite_loss import NonFiniteLossError
from ldm.models.preemption import PreemptionCheckpoint, PreemptionExit
from ldm.models.quality_callback import QualityMetrics
from ldm.models.rank_failure import RankFailureExit
from ldm.models.trainable_ema import TrainableEMA

__all__ = ["AutoencoderKL", "LatentDiffusion", "NonFiniteLossError", "PreemptionCheckpoint", "PreemptionExit",
           "QualityMetrics", "RankFailureExit", "SavePretrained", "TrainableEMA"]
