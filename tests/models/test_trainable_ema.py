"""TrainableEMA: an exponential moving average of the trained parameters only; validation and the export use it, a
resumed run continues it, and under LoRA the checkpoint stays slim."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from ldm.models import TrainableEMA


class Toy(pl.LightningModule):
    """A trained linear layer after a frozen one; records the weights after every step and during validation."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 1)
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.head(self.frozen(x)) - y) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after_step.append({n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad})

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.head.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def _loader(n: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp_path: Path, steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    settings = dict(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path, num_sanity_val_steps=0, enable_checkpointing=False, callbacks=callbacks)
    return pl.Trainer(**{**settings, **kwargs})


def _expected(history: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor], decay: float, warmup: bool, done: int = 0):
    shadow = {n: t.clone() for n, t in start.items()}
    for n_updates, weights in enumerate(history, start=done):
        d = min(decay, (1 + n_updates) / (10 + n_updates)) if warmup else decay
        shadow = {n: d * shadow[n] + (1 - d) * weights[n] for n in shadow}
    return shadow


@pytest.mark.parametrize("warmup", [True, False])
def test_the_model_ends_with_the_average_of_its_trained_weights_only(tmp_path, warmup):
    pl.seed_everything(0)
    model = Toy()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = model.frozen.weight.detach().clone()
    ema = TrainableEMA(decay=0.8, warmup=warmup)
    _trainer(tmp_path, 6, [ema], limit_val_batches=0).fit(model, _loader())
    assert len(model.after_step) == 6 and set(ema._shadow) == {"head.weight", "head.bias"}  # nothing frozen is copied
    expected = _expected(model.after_step, start, 0.8, warmup)
    for name, value in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), value)
    assert not torch.equal(model.head.weight, model.after_step[-1]["head.weight"])  # not the last iterate
    assert torch.equal(model.frozen.weight, frozen)


def test_validation_sees_the_average_and_training_goes_on_with_its_own_weights(tmp_path):
    pl.seed_everything(0)
    model = Toy()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _trainer(tmp_path, 8, [TrainableEMA(decay=0.5)], val_check_interval=4, limit_val_batches=1).fit(model, _loader(), _loader(4))
    average_at_4 = _expected(model.after_step[:4], start, 0.5, True)["head.weight"]
    torch.testing.assert_close(model.seen_in_validation[0], average_at_4)
    # Step 5 started from step 4's trained weights, not from the average shown to validation.
    pl.seed_everything(0)
    reference = Toy()
    _trainer(tmp_path / "plain", 8, [], limit_val_batches=0).fit(reference, _loader())
    for ours, plain in zip(model.after_step, reference.after_step):
        torch.testing.assert_close(ours["head.weight"], plain["head.weight"])


# A checkpoint at the end of each epoch (3 steps); or every 5 steps, where a run that stops at step 2 gets its last.ckpt
# from Lightning's save at the end of training, after the average went into the model: it must still hold the
# trained weights (it did not before: a run extended with a higher max_steps then continued from the average).
@pytest.mark.parametrize(("first_steps", "every_n_train_steps"), [(3, None), (2, 5)])
def test_resumed_run_continues_the_same_average(tmp_path, first_steps, every_n_train_steps):
    def run(steps: int, ckpt_path: str | None = None) -> tuple[Toy, TrainableEMA]:
        pl.seed_everything(0)
        model, ema = Toy(), TrainableEMA(decay=0.7)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=every_n_train_steps)
        _trainer(tmp_path, steps, [ema, checkpoint], limit_val_batches=0, enable_checkpointing=True).fit(
            model, _loader(12), ckpt_path=ckpt_path)
        return model, ema

    first, _ = run(first_steps)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == first_steps
    state = saved["callbacks"][TrainableEMA().state_key]
    assert state["updates"] == first_steps
    torch.testing.assert_close(state["shadow"]["head.weight"], _expected(first.after_step, _initial(), 0.7, True)["head.weight"])
    assert torch.equal(saved["state_dict"]["head.weight"], first.after_step[-1]["head.weight"])  # the trained weights
    resumed, ema = run(6, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert ema.updates == 6 and len(resumed.after_step) == 6 - first_steps
    expected = _expected(resumed.after_step, state["shadow"], 0.7, True, done=first_steps)
    torch.testing.assert_close(resumed.head.weight.detach(), expected["head.weight"])
    torch.testing.assert_close(resumed.head.bias.detach(), expected["head.bias"])


def _initial() -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    return {n: p.detach().clone() for n, p in Toy().named_parameters() if p.requires_grad}


def test_a_checkpoint_written_for_other_parameters_is_refused(tmp_path):
    ema = TrainableEMA()
    ema.load_state_dict({"updates": 2, "shadow": {"other.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="lacks 2 trained parameters"):
        _trainer(tmp_path, 1, [ema], limit_val_batches=0).fit(Toy(), _loader())


@pytest.mark.parametrize("decay, start_step", [(1.0, 0), (-0.1, 0), (0.9, -1)])
def test_bad_settings_are_refused(decay, start_step):
    with pytest.raises(ValueError, match="TrainableEMA"):
        TrainableEMA(decay=decay, start_step=start_step)


def test_lora_checkpoint_stays_slim_and_the_export_is_the_average(tmp_path):
    from conftest import save_tiny_base_model
    from safetensors.torch import load_file

    from ldm.data import ImageCaptionDataModule
    from ldm.models import LatentDiffusion, SavePretrained
    from ldm.models.latent_diffusion_config import ValidationConfig

    assets, base = save_tiny_base_model(tmp_path / "base")
    pl.seed_everything(0)
    model = LatentDiffusion(init_from=str(base), lora_rank=2, validation=ValidationConfig(prompts=[]))
    ema = TrainableEMA(decay=0.9)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, 4, [ema, ckpt, SavePretrained(str(tmp_path / "out"))], enable_checkpointing=True,
                       limit_val_batches=0)
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(assets["data"]), batch_size=4, val_fraction=0.25))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all("lora_" in k or "." not in k for k in saved["state_dict"]) and saved["ldm_frozen_keys_omitted"] > 0
    shadow = saved["callbacks"][ema.state_key]["shadow"]
    assert shadow and all("lora_" in k for k in shadow)
    exported = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    lora_b = [v for k, v in ema._shadow.items() if "lora_B" in k]
    assert any(float(v.abs().max()) > 0 for v in lora_b)  # the adapters moved from their zero start
    total = sum(float(v.double().sum()) for v in exported.values())
    assert total == pytest.approx(sum(float(model.state_dict()[k].double().sum()) for k in ema._shadow), rel=1e-6)


def test_one_update_per_optimiser_step_under_gradient_accumulation(tmp_path):
    pl.seed_everything(0)
    ema = TrainableEMA(decay=0.9)
    _trainer(tmp_path, 3, [ema], limit_val_batches=0, accumulate_grad_batches=2).fit(Toy(), _loader())
    assert ema.updates == 3
