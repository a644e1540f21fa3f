"""The `ldm` command: help lists every knob, `data prepare`, `fit` from a YAML config, `reconstruct`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ldm.cli import main
from ldm.models import AutoencoderKL

REPO = Path(__file__).resolve().parents[2]


def test_fit_help_documents_every_model_and_data_argument():
    out = subprocess.run([sys.executable, "-m", "ldm.cli", "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import inspect

    from ldm.data import ImageCaptionDataModule, PrecomputedLatentsDataModule, StreamingImageCaptionDataModule

    from ldm.models import LatentDiffusion

    import dataclasses

    for model_class in (AutoencoderKL, LatentDiffusion):
        for name, param in inspect.signature(model_class.__init__).parameters.items():
            if name == "self":
                continue
            if dataclasses.is_dataclass(param.default):  # a typed group: every field shows, with its doc
                for field in dataclasses.fields(param.default):
                    assert f"--model.{name}.{field.name} " in out.stdout, (model_class.__name__, name, field.name)
            else:
                assert f"--model.{name} " in out.stdout, (model_class.__name__, name)
    for data_class in (ImageCaptionDataModule, StreamingImageCaptionDataModule, PrecomputedLatentsDataModule):
        for name in inspect.signature(data_class.__init__).parameters:
            if name != "self":
                assert f"--data.{name} " in out.stdout, (data_class.__name__, name)
    assert "Precomputed VAE moments" in out.stdout
    assert "Training batches before the discriminator" in out.stdout  # docstrings become help text
    assert "Base channel width of encoder and decoder" in out.stdout  # a config dataclass's field docs too
    assert "--trainer.devices" in out.stdout


def test_data_prepare_writes_a_builtin_dataset(tmp_path, capsys):
    main(["data", "prepare", "shapes", "--out", str(tmp_path / "shapes"), "--num-images", "12", "--seed", "3"])
    rows = [json.loads(line) for line in (tmp_path / "shapes" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all((tmp_path / "shapes" / r["file_name"]).is_file() for r in rows)
    assert "Prepared shapes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "prepare", "imagenet", "--out", str(tmp_path / "x")])


def test_unknown_command_fails_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2 and "ldm data prepare" in capsys.readouterr().err


def test_fit_from_yaml_then_reconstruct(tmp_path, tiny_dataset, tiny_vae_kwargs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((REPO / "configs" / "autoencoder" / "digits.yaml").read_text())
    base["model"]["init_args"].update(tiny_vae_kwargs, disc_start=1, scale_factor_batches=1)
    base["data"] = {"root": str(tiny_dataset), "batch_size": 4, "val_fraction": 0.25}
    base["trainer"].update(max_epochs=1, limit_train_batches=3, enable_progress_bar=False, check_val_every_n_epoch=1)
    base["trainer"]["callbacks"][-1]["init_args"]["dirpath"] = str(tmp_path / "vae")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(base))

    main(["fit", "--config", str(config)])
    model = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert model.hparams.vae["ch"] == tiny_vae_kwargs["vae"]["ch"] and float(model.scaling_factor) != 1.0
    last = tmp_path / "logs" / "autoencoder-digits" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    step_after_first = torch.load(last, map_location="cpu", weights_only=True)["global_step"]

    # A crashed or finished run continues from its last checkpoint with `--ckpt_path last`.
    main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    # Exactly one more epoch was trained. (last.ckpt's "epoch" is 1 when the epoch-end top-k save wrote it and 2
    # when the train-end save did, which happens when val/psnr did not improve; both hold the finished run.)
    assert resumed["global_step"] > step_after_first
    assert resumed["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == 2

    main(["reconstruct", "--model", str(tmp_path / "vae"), "--data", str(tiny_dataset), "--out", str(tmp_path / "grid.png")])
    out = capsys.readouterr().out
    assert "PSNR" in out and (tmp_path / "grid.png").is_file()


def test_every_config_parses(capsys):
    """The YAML configs are complete, runnable examples: each parses against the current classes (print_config
    stops before anything is built, so the multi-node one needs no GPU, VAE or data)."""
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 5
    for config in configs:
        with pytest.raises(SystemExit) as stop:
            main(["fit", "--config", str(config), "--print_config"])
        assert stop.value.code in (0, None), config
        assert "class_path: ldm." in capsys.readouterr().out, config
