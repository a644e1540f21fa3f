"""``pipe.to_channels_last()`` and ``pipe.compile()``: the same images as the plain pipeline, and saving writes the
usual keys. Compilation uses the ``aot_eager`` backend (traced, no code generation: fast and CI-safe)."""

import pytest
import torch
from safetensors import safe_open

from ldm.nn.speedups import is_compiled
from ldm.pipeline import LatentDiffusionPipeline
from test_pipeline import tiny_pipeline

KW = dict(num_inference_steps=3, guidance_scale=4.0, seed=3, progress=False, output_type="latent")
PROMPTS = ["a red circle 1", "a blue square"]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_channels_last_pipeline_gives_the_same_latents_and_saves_plain_keys(tmp_path, mode):
    torch._dynamo.reset()
    plain = tiny_pipeline(tmp_path / "tok")
    expected = plain(PROMPTS, **KW).images
    keys = list(plain.unet.state_dict())

    fast = tiny_pipeline(tmp_path / "tok2")  # same seed: the same weights
    assert fast.to_channels_last().compile(mode=mode, backend="aot_eager") is fast
    assert is_compiled(fast.unet) and fast.compile_mode == mode
    assert fast.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(PROMPTS, **KW).images, expected, atol=1e-5, rtol=1e-5)
    # A second call (the sampler's batch of 2 x CFG again) reuses the compiled graph and still agrees.
    torch.testing.assert_close(fast(PROMPTS, **KW).images, expected, atol=1e-5, rtol=1e-5)

    assert list(fast.unet.state_dict()) == keys
    folder = fast.save_pretrained(tmp_path / "saved")
    with safe_open(str(folder / "unet" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(keys)
    again = LatentDiffusionPipeline.from_pretrained(folder)
    torch.testing.assert_close(again(PROMPTS, **KW).images, expected, atol=1e-5, rtol=1e-5)


def test_unknown_compile_mode_is_refused(tmp_path):
    pipe = tiny_pipeline(tmp_path / "tok")
    with pytest.raises(ValueError, match="mode='fast'"):
        pipe.compile(mode="fast")
    assert pipe.compile_mode is None
