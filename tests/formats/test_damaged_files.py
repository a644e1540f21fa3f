"""A damaged or truncated weights file, in every layout, is refused with an error naming the file (never safetensors'
bare "header too large" or "incomplete metadata")."""

import pytest

from test_config_validation import LOADERS, _copy, saved  # noqa: F401  (the valid tiny model in every layout)

WEIGHTS = {"ours": "unet/model.safetensors", "diffusers": "vae/diffusion_pytorch_model.safetensors",
           "sd": "", "autoencoder": "model.safetensors", "lora": ""}


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
@pytest.mark.parametrize("layout", sorted(WEIGHTS))
def test_a_damaged_weights_file_is_named(saved, tmp_path, layout, damage):  # noqa: F811
    root = _copy(saved, layout, tmp_path)
    target = root / WEIGHTS[layout] if WEIGHTS[layout] else root
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:64])
    with pytest.raises(ValueError, match="not a readable .safetensors file") as info:
        LOADERS[layout](root)
    assert str(target) in str(info.value)
