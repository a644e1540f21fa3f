"""SDXL models through the rest of the pipeline API and its CLI twin: img2img and inpainting with SDXL conditioning,
`ldm generate` with the SDXL options, and those options refused for an SD model (tiny random-weight models)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))

KW = dict(num_inference_steps=3, seed=0, output_type="pt", progress=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    from test_sdxl_generation_parity import _build

    root = tmp_path_factory.mktemp("sdxl")
    _, ours = _build(diffusers, root)
    return root / "sdxl", ours


def test_sdxl_img2img_and_inpainting(sdxl):
    _, pipe = sdxl
    init = torch.rand(1, 3, 32, 32) * 2 - 1
    weak = pipe.img2img("a green triangle", init, strength=0.3, **KW).images
    strong = pipe.img2img("a green triangle", init, strength=1.0, **KW).images
    assert torch.isfinite(weak).all() and (weak - init).abs().mean() < (strong - init).abs().mean()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1
    painted = pipe.inpaint("a green triangle", init, mask, original_size=(64, 64), **KW).images
    torch.testing.assert_close(painted[..., :16], init.clamp(-1, 1)[..., :16])  # kept where the mask is black


def test_generate_cli_takes_the_sdxl_options(sdxl, tmp_path, capsys):
    folder, pipe = sdxl
    main(["generate", "a blue square", "--model", str(folder), "--steps", "2", "--seed", "3", "--height", "32", "--width",
          "32", "--prompt-2", "a red circle", "--original-size", "64", "48", "--crop-top-left", "8", "0",
          "--target-size", "32", "32", "--out", str(tmp_path / "out"), "--device", "cpu"])
    (png,) = [Path(x) for x in capsys.readouterr().out.split() if x.endswith(".png")]
    expected = pipe("a blue square", prompt_2="a red circle", original_size=(64, 48), crops_coords_top_left=(8, 0),
                    target_size=(32, 32), height=32, width=32, num_inference_steps=2, seed=3, progress=False,
                    output_type="np").images[0]
    np.testing.assert_allclose(np.asarray(Image.open(png)), np.round(expected * 255), atol=1)


def test_sdxl_options_on_an_sd_model_are_a_clear_error(tmp_path):
    from conftest import save_tiny_base_model
    from ldm.pipeline import LatentDiffusionPipeline

    _, folder = save_tiny_base_model(tmp_path)
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="prompt_2 applies to SDXL models only"):
        pipe("image 1", prompt_2="image 2", **KW)
    with pytest.raises(ValueError, match="crops_coords_top_left applies to SDXL models only"):
        pipe("image 1", crops_coords_top_left=(4, 4), **KW)
