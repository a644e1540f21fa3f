"""Evaluation of trained models (metrics computed on held-out data)."""

from ldm.evaluation.clip_score import ClipScorer
from ldm.evaluation.feature_networks import DataFeatureNetwork, FeatureNetwork, InceptionFeatureNetwork, build_feature_network
from ldm.evaluation.quality import evaluate_model_quality, evaluate_quality, quality_metrics
from ldm.evaluation.reconstruction import evaluate_reconstruction

__all__ = ["ClipScorer", "DataFeatureNetwork", "FeatureNetwork", "InceptionFeatureNetwork", "build_feature_network",
           "evaluate_model_quality", "evaluate_quality", "evaluate_reconstruction", "quality_metrics"]
