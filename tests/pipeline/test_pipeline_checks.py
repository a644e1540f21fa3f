"""Reliability of the pipeline's inputs and outputs: non-finite numbers and broken models raise clear errors
instead of returning black images, and sizes are checked against a limit before anything is allocated."""

import copy

import numpy as np
import pytest
import torch

from ldm.pipeline import LatentDiffusionPipeline
from ldm.pipeline.checks import NonFiniteOutputError

from test_pipeline import pipe  # noqa: F401  (the tiny pipeline fixture)

KW = dict(num_inference_steps=2, seed=0, progress=False, output_type="pt")


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_rescale=float("nan")), "guidance_rescale"),
    (dict(guidance_rescale=1.5), "guidance_rescale"),
    (dict(eta=float("nan"), sampler="ddim"), "eta"),
    (dict(eta=-0.1, sampler="ddim"), "eta"),
    (dict(height=0, width=32), "height"),
    (dict(height=32, width=-32), "width"),
])
def test_bad_numbers_are_refused_by_name(pipe, kwargs, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **{**KW, **kwargs})


def test_sizes_over_the_limit_are_refused_before_allocating(pipe):  # noqa: F811
    with pytest.raises(ValueError, match="GiB") as info:
        pipe("a red circle", height=100_000, width=100_000, **KW)  # 10^10 pixels: would need tens of GiB
    assert "max_pixels" in str(info.value)
    small = copy.copy(pipe)
    small.max_pixels = 16 * 16
    with pytest.raises(ValueError, match="over the limit"):
        small("a red circle", height=32, width=32, **KW)
    small.max_pixels = 32 * 32
    assert small("a red circle", height=32, width=32, **KW).images.shape == (1, 3, 32, 32)


def test_too_many_images_in_one_call_are_refused_before_allocating(pipe):  # noqa: F811
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe("a red circle", num_images_per_prompt=2.5, **KW)
    with pytest.raises(ValueError, match="pixels in one call") as info:
        pipe(["a red circle"] * 10, num_images_per_prompt=100_000, height=32, width=32, **KW)
    assert "max_batch_pixels" in str(info.value) and "GiB" in str(info.value)
    few = copy.copy(pipe)
    few.max_batch_pixels = 2 * 32 * 32
    with pytest.raises(ValueError, match="3 images of 32x32"):
        few("a red circle", num_images_per_prompt=3, height=32, width=32, **KW)
    assert few("a red circle", num_images_per_prompt=2, height=32, width=32, **KW).images.shape[0] == 2


def test_a_model_whose_sample_size_is_absurd_is_refused_at_construction(pipe):  # noqa: F811
    from ldm.pipeline import LatentDiffusionPipeline

    parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, schedule=pipe.schedule,
                 prediction_type=pipe.prediction_type, scaling_factor=pipe.scaling_factor)
    for size in (10**9, 0, -64, 33, 64.0):
        with pytest.raises(ValueError, match="sample_size"):
            LatentDiffusionPipeline(**parts, sample_size=size)


def test_img2img_strength_and_non_finite_init_images(pipe):  # noqa: F811
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    for strength in (0.0, float("nan"), 1.5):
        with pytest.raises(ValueError, match="strength"):
            pipe.img2img("a red circle", image, strength=strength, **KW)
    bad = torch.full((1, 3, 32, 32), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        pipe.img2img("a red circle", bad, strength=0.5, **KW)


def test_nan_weights_raise_instead_of_returning_black_images(pipe):  # noqa: F811
    broken = copy.deepcopy(pipe)
    with torch.no_grad():
        next(broken.unet.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="weights"):
        broken("a red circle", **KW)


def test_a_broken_scaling_factor_is_refused_at_load(pipe):  # noqa: F811
    for value in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scaling_factor"):
            LatentDiffusionPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.schedule, "epsilon", value, 32)


def test_a_lora_file_that_does_not_fit_leaves_the_pipeline_untouched(pipe, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from ldm.formats.lora_files import save_lora
    from ldm.nn.lora import add_lora, lora_layers

    source = copy.deepcopy(pipe)
    add_lora(source.unet, rank=4)
    good = save_lora(tmp_path / "good.safetensors", unet=source.unet)
    tensors = load_file(str(good))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, tensors[key].shape[1] + 3)  # one layer's input width is wrong
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={})

    fresh = copy.deepcopy(pipe)
    before = fresh("a red circle", **KW).images
    with pytest.raises(ValueError, match="bad.safetensors"):
        fresh.load_lora(tmp_path / "bad.safetensors")
    assert not lora_layers(fresh.unet)  # the injected adapters were removed again
    torch.testing.assert_close(fresh("a red circle", **KW).images, before, rtol=0, atol=0)
    fresh.save_pretrained(tmp_path / "still-saves")  # refused while adapters are loaded

    # A pipeline that already has adapters keeps them as they were.
    loaded = copy.deepcopy(pipe).load_lora(good, scale=0.5)
    with_adapters = loaded("a red circle", **KW).images
    with pytest.raises(ValueError, match="bad.safetensors"):
        loaded.load_lora(tmp_path / "bad.safetensors")
    torch.testing.assert_close(loaded("a red circle", **KW).images, with_adapters, rtol=0, atol=0)


def test_saved_images_never_overwrite_each_other(tmp_path):
    from PIL import Image

    from ldm.pipeline.image_io import save_png_with_metadata

    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    first = save_png_with_metadata(red, tmp_path / "a-red-circle-0.png", {"prompt": "a red circle!"})
    second = save_png_with_metadata(blue, tmp_path / "a-red-circle-0.png", {"prompt": "a red circle?"})
    third = save_png_with_metadata(blue, tmp_path / "a-red-circle-0.png", {"prompt": "a red circle."})
    assert (first.name, second.name, third.name) == ("a-red-circle-0.png", "a-red-circle-0-1.png", "a-red-circle-0-2.png")
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0)  # the first image is still there


def test_integer_or_nan_weights_are_refused_on_load_and_on_export(pipe, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    folder = pipe.save_pretrained(tmp_path / "good")
    weights = folder / "unet" / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim > 1)

    relabelled = dict(state, **{key: state[key].view(torch.int32)})  # the same bytes, called int32
    save_file(relabelled, str(weights))
    with pytest.raises(ValueError, match="floating point") as info:
        LatentDiffusionPipeline.from_pretrained(folder)
    assert "unet" in str(info.value) and key in str(info.value)

    broken = dict(state, **{key: torch.full_like(state[key], float("nan"))})
    save_file(broken, str(weights))
    with pytest.raises(ValueError, match="NaN"):
        LatentDiffusionPipeline.from_pretrained(folder)

    nan_model = copy.deepcopy(pipe)
    with torch.no_grad():
        next(nan_model.unet.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="not written"):
        nan_model.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_numpy_and_tensor_numbers_still_work(pipe):  # noqa: F811
    out = pipe("a red circle", height=np.int64(32), width=np.int64(32), guidance_scale=np.float32(3.0),
               eta=torch.tensor(0.0), sampler="ddim", **KW)
    assert out.images.shape == (1, 3, 32, 32)
