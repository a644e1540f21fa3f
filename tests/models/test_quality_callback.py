"""The QualityMetrics callback: FD_data/KID_data of validation samples logged during a tiny fit; usable from YAML."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from conftest import run_ddp_script, tiny_ldm_kwargs

from ldm.cli import main
from ldm.data import ImageCaptionDataModule
from ldm.models import LatentDiffusion, QualityMetrics


def test_fit_logs_fd_data_and_kid_data_every_n_epochs(tmp_path, ldm_assets):
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, validation={"prompts": []}))
    dm = ImageCaptionDataModule(root=str(ldm_assets["data"]), batch_size=4, val_fraction=0.25)
    callback = QualityMetrics(every_n_epochs=2, num_samples=4, steps=2, batch_size=3, feature_cache=str(tmp_path / "cache"),
                              feature_steps=10)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=1, callbacks=[callback])
    trainer.fit(model, dm)
    assert callback._last_epoch == 1  # epochs 0, 1, 2: only after the second (and not in the sanity check)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and k != "val/loss"}
    assert set(logged) == {"val/fd_data", "val/kid_data", "val/fd_data_floor", "val/kid_data_floor"}
    assert logged["val/fd_data"] > 0
    assert logged == pytest.approx({f"val/{k}": v for k, v in callback.last_metrics.items()}, rel=1e-6)  # logged as fp32
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the network is cached for later evaluations


def test_under_ddp_rank_zero_computes_and_every_rank_logs_the_same_figures(tmp_path):
    run_ddp_script(Path(__file__).resolve().parents[1] / "scripts" / "ddp_quality_metrics.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert set(ranks[0]["logged"]) == {"val/fd_data", "val/kid_data", "val/fd_data_floor", "val/kid_data_floor"}
    assert ranks[0]["logged"] == ranks[1]["logged"]
    # A ModelCheckpoint monitoring the figure works on both ranks (it needs the value on each).
    assert ranks[0]["best_score"] == ranks[1]["best_score"] <= ranks[0]["logged"]["val/fd_data"] + 1e-6
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # trained once, by rank 0


def test_configurable_from_yaml(tmp_path, capsys):
    config = {
        "model": {"class_path": "ldm.models.AutoencoderKL"},
        "trainer": {"callbacks": [{"class_path": "ldm.models.QualityMetrics",
                                   "init_args": {"every_n_epochs": 3, "num_samples": 100, "sampler": "ddim"}}]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(path), "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    (callback,) = [c for c in printed["trainer"]["callbacks"] if c["class_path"] == "ldm.models.QualityMetrics"]
    assert callback["init_args"]["every_n_epochs"] == 3 and callback["init_args"]["sampler"] == "ddim"
    assert callback["init_args"]["feature_cache"] == "data/cache/feature-nets"


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        QualityMetrics(num_samples=1)
    with pytest.raises(ValueError, match="every_n_epochs"):
        QualityMetrics(every_n_epochs=0)
    with pytest.raises(ValueError, match="sampler 'nope' is unknown"):
        QualityMetrics(sampler="nope")
    with pytest.raises(FileNotFoundError, match="inception_weights .*missing.pth.*no such file"):
        QualityMetrics(inception_weights=str(tmp_path / "missing.pth"))
