"""The Inception-v3 network of FID, KID and IS, loaded from a local weights file.

FID is defined by one network: TensorFlow's Inception-v3 graph of 2015-12-05 as the original FID code ran it. Its
PyTorch port (``pt_inception-2015-12-05-6726825d.pth`` of pytorch-fid; the same tensors as torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``, which torchmetrics downloads) is torchvision's Inception-v3 layout
with four differences from torchvision's own network, all reproduced here:

- the input is resized to 299x299 the way TensorFlow 1's ``resize_bilinear`` does (no half-pixel centres), from
  8-bit pixel values, and scaled to [-1, 1] as ``(x - 128) / 128``;
- the average pools inside the Inception blocks leave the zero padding out of the average (TensorFlow's);
- the last block (``Mixed_7c``) max-pools its pool branch instead of averaging;
- the classifier has 1,008 outputs (``fc``), of which IS uses the logits without the bias ("logits_unbiased").

Nothing is downloaded: :func:`load_fid_inception` reads the file the user has (``torch.load`` with
``weights_only=True``, or ``.safetensors``) and checks every key. ``tests/evaluation/test_inception.py`` compares
the outputs with torch-fidelity's implementation given the same (random) weights.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

__all__ = ["FIDInceptionV3", "load_fid_inception", "resize_bilinear_tf1"]

INPUT_SIZE = 299
WEIGHTS_HELP = ("the FID Inception-v3 weights as a local file: pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or "
                "weights-inception-2015-12-05-6726825d.pth (torch-fidelity), or the same tensors as .safetensors")


def resize_bilinear_tf1(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) as TensorFlow 1's ``resize_bilinear(align_corners=False)``: output pixel ``i``
    samples input position ``i * in / out`` (no half-pixel offset), clamped at the last row/column."""
    for dim, size in ((2, height), (3, width)):
        n = x.shape[dim]
        position = torch.arange(size, dtype=torch.float64, device=x.device) * (n / size)
        low = position.floor().long().clamp(max=n - 1)
        high = (low + 1).clamp(max=n - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        weight = (position - low).to(x.dtype).view(shape)
        a, b = x.index_select(dim, low), x.index_select(dim, high)
        x = a + (b - a) * weight
    return x


def _avg_pool_without_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(tv.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_avg_pool_without_padding(x))]


class _BlockC(tv.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return [self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_without_padding(x))]


class _BlockE(tv.InceptionE):
    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_without_padding(x)
        return [self.branch1x1(x), b3, d3, self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """Inception-v3 as FID's TensorFlow graph computes it; the parameter names are those of the FID weight files.

    ``forward(images)`` takes (B, 3, H, W) images in [-1, 1] (any size), quantises them to 8 bits as a saved PNG
    would be, and returns the 2,048 pool features (FID, KID) and the 1,008 unbiased logits (IS).
    """

    def __init__(self) -> None:
        super().__init__()
        conv = tv.BasicConv2d
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = tv.InceptionB(288)
        self.Mixed_6b = _BlockC(768, channels_7x7=128)
        self.Mixed_6c = _BlockC(768, channels_7x7=160)
        self.Mixed_6d = _BlockC(768, channels_7x7=160)
        self.Mixed_6e = _BlockC(768, channels_7x7=192)
        self.Mixed_7a = tv.InceptionD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)  # batch norm always uses the stored statistics

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round()  # 0..255, as 8-bit images
        x = (resize_bilinear_tf1(pixels, INPUT_SIZE, INPUT_SIZE) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return pool, pool @ self.fc.weight.T


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the weights in ``path`` (a ``torch.save``d state dict, read with
    ``weights_only=True``, or ``.safetensors``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is damaged, not a weights file, or not these weights (missing, unexpected or
            misshapen keys), naming the file and what it should be.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {str(path)!r}: no such file; give {WEIGHTS_HELP}")
    state = _read_state(path)
    net = FIDInceptionV3()
    expected = net.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    misshapen = sorted(k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or misshapen:
        problems = [f"{label} {len(keys)} (e.g. {keys[:3]})" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys]
        raise ValueError(f"Inception weights {str(path)!r} are not the FID Inception-v3's: {'; '.join(problems)}; "
                         f"give {WEIGHTS_HELP}")
    bad = [k for k, v in state.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"Inception weights {str(path)!r}: {len(bad)} tensor(s) are not finite floating point "
                         f"(e.g. {bad[:3]}); the file is damaged: copy it again")
    net.load_state_dict(state, strict=False)  # every key checked above; num_batches_tracked is not used
    return net.to(device)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from ldm.formats.weights import read_safetensors

        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"Inception weights {str(path)!r} cannot be read as PyTorch weights ({first}): the file is "
                         f"damaged or truncated, or not a weights file; give {WEIGHTS_HELP}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {str(path)!r} hold a {type(state).__name__}, not a state dict of tensors; "
                         f"give {WEIGHTS_HELP}")
    return state
