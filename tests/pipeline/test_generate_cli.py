"""`ldm generate` and loading a Lightning checkpoint into the pipeline."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_ldm_kwargs
from ldm.cli import main
from ldm.data import ImageCaptionDataModule
from ldm.models import LatentDiffusion, SavePretrained
from ldm.pipeline import LatentDiffusionPipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_ldm_assets

    root = tmp_path_factory.mktemp("trained")
    assets = make_ldm_assets(root / "assets")
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(assets))
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[pl.callbacks.EMAWeightAveraging(decay=0.5),
                                    pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
                                    SavePretrained(str(root / "export"))])
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(assets["data"]), batch_size=4, val_fraction=0.25))
    return root


def test_pipeline_loads_a_lightning_checkpoint_with_ema_weights(trained):
    from_ckpt = LatentDiffusionPipeline.from_pretrained(trained / "ckpt" / "last.ckpt")
    exported = LatentDiffusionPipeline.from_pretrained(trained / "export")
    for a, b in zip(from_ckpt.unet.state_dict().values(), exported.unet.state_dict().values()):
        assert torch.equal(a, b)  # the export holds the EMA weights, and so does the checkpoint's state_dict
    raw = LatentDiffusionPipeline.from_pretrained(trained / "ckpt" / "last.ckpt", use_ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.unet.state_dict().values(), exported.unet.state_dict().values()))
    assert from_ckpt.sample_size == exported.sample_size == 32


def test_generate_cli_writes_pngs_with_settings(trained, tmp_path, capsys):
    out = tmp_path / "out"
    main(["generate", "image 1", "--model", str(trained / "export"), "--steps", "3", "--guidance", "4", "--seed", "5",
          "--num-images", "2", "--out", str(out), "--device", "cpu"])
    printed = [Path(line) for line in capsys.readouterr().out.split() if line.endswith(".png")]
    assert len(printed) == 2 and all(p.is_file() for p in printed)
    info = Image.open(printed[0]).text
    assert info["prompt"] == "image 1" and info["seed"] == "5" and info["steps"] == "3"
    assert info["sampler"] == "dpmpp_2m" and info["guidance"] == "4.0" and "Negative prompt" in info["parameters"]
    assert Image.open(printed[1]).text["seed"] == "6"

    init = tmp_path / "init.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((32, 16), 255, dtype=np.uint8), ((0, 0), (16, 0)))).save(mask)
    main(["generate", "picture 2", "--model", str(trained / "export"), "--steps", "3", "--seed", "1", "--out", str(out),
          "--init-image", str(init), "--strength", "0.5", "--device", "cpu"])
    main(["generate", "picture 2", "--model", str(trained / "export"), "--steps", "3", "--seed", "2", "--out", str(out),
          "--init-image", str(init), "--mask", str(mask), "--device", "cpu"])
    lines = [Path(x) for x in capsys.readouterr().out.split() if x.endswith(".png")]
    assert Image.open(lines[0]).text["mode"] == "img2img" and Image.open(lines[0]).text["strength"] == "0.5"
    inpainted = np.asarray(Image.open(lines[1]))
    assert Image.open(lines[1]).text["mode"] == "inpaint"
    assert (inpainted[:, :16] == 200).all()  # unmasked pixels kept

    with pytest.raises(SystemExit):
        main(["generate", "x", "--model", str(trained / "export"), "--mask", str(mask)])
