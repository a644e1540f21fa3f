"""The feature networks behind the distribution figures, and what each figure may be called.

Two networks, one interface (:class:`FeatureNetwork`: ``features(images)``, ``class_probabilities(images)``, and the
keys and labels of its figures):

- :class:`InceptionFeatureNetwork`: FID's Inception-v3 from a local weights file (``--inception-weights``;
  :mod:`ldm.evaluation.inception`). Only its figures are called FID, KID and IS.
- :class:`DataFeatureNetwork`: a small CNN trained on the dataset itself (:mod:`ldm.evaluation.data_features`),
  for machines without those weights. Its figures are FD_data and KID_data; it has no class probabilities, so no IS.
  The trained network is cached as ``<cache_dir>/<fingerprint>.safetensors``, the fingerprint covering the data's
  files (paths, sizes, modification times), their captions, the image size and the training settings, so every
  evaluation of the same data compares with the same network, and changed data trains a new one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ldm.data.fingerprints import file_signature, fingerprint
from ldm.evaluation.data_features import DataFeatureNet, DataFeatureSettings, train_data_feature_net

__all__ = ["DataFeatureNetwork", "FeatureNetwork", "InceptionFeatureNetwork", "build_feature_network"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "ldm-data-feature-net"
CACHE_VERSION = 2  # bump when the network or its training changes: old cache files are then not used


class FeatureNetwork:
    """A network whose features the Frechet distance and KID compare.

    Attributes:
        kind: ``"inception"`` or ``"data"``.
        keys: JSON keys of its figures: ``fd``, ``kid`` (and ``is`` when it has class probabilities).
        labels: Printed names of those figures (``FID``/``KID``/``IS``, or ``FD_data``/``KID_data``).
        info: What it is, for reports (JSON-able).
    """

    kind: str = ""
    keys: dict[str, str] = {}
    labels: dict[str, str] = {}
    info: dict = {}
    net: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _outputs(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @torch.no_grad()
    def _run(self, images: torch.Tensor, index: int | None, batch_size: int):
        """Output ``index`` of :meth:`_outputs` over ``images`` in batches, as float64 numpy; all outputs for None."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        parts = []
        for start in range(0, len(images), batch_size):
            out = self._outputs(images[start : start + batch_size].to(self.device))
            out = out if isinstance(out, tuple) else (out,)
            parts.append([o.double().cpu() for o in out])
        columns = [torch.cat(column).numpy() for column in zip(*parts)]
        return columns if index is None else columns[index]

    def features(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """(N, 3, H, W) images in [-1, 1] -> (N, D) float64 features."""
        return self._run(images, 0, batch_size)

    def class_probabilities(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray | None:
        """(N, C) class probabilities for IS, or None when the network has no classes."""
        return None

    def features_and_probabilities(self, images: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`features` and :meth:`class_probabilities` (one pass through the network where it has both)."""
        return self.features(images, batch_size), self.class_probabilities(images, batch_size)


class InceptionFeatureNetwork(FeatureNetwork):
    """FID's Inception-v3 (pool features; softmax of the unbiased logits for IS) from a local weights file.

    Args:
        weights: The weights file (see :func:`ldm.evaluation.inception.load_fid_inception`).
        device: Where to run it.
    """

    kind = "inception"
    keys = {"fd": "fid", "kid": "kid", "is": "is"}
    labels = {"fd": "FID", "kid": "KID", "is": "IS"}

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu"):
        from ldm.evaluation.inception import load_fid_inception

        self.net = load_fid_inception(weights, device)
        self.info = {"kind": self.kind, "weights": str(weights), "features": "Inception-v3 pool (2048)"}

    def _outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)
        return pool, logits.softmax(dim=1, dtype=torch.float64)

    def class_probabilities(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Softmax of the 1,008 unbiased logits (as torchmetrics' and torch-fidelity's IS)."""
        return self._run(images, 1, batch_size)

    def features_and_probabilities(self, images: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        both = self._run(images, None, batch_size)
        return both[0], both[1]


class DataFeatureNetwork(FeatureNetwork):
    """The dataset's own feature network (see the module docstring); build it with :meth:`for_dataset`."""

    kind = "data"
    keys = {"fd": "fd_data", "kid": "kid_data"}
    labels = {"fd": "FD_data", "kid": "KID_data"}

    def __init__(self, net: DataFeatureNet, summary: dict, cache_file: Path | None = None, trained_now: bool = True):
        self.net = net.eval()
        self.summary = summary
        self.info = {"kind": self.kind, "objective": summary["objective"], "vocabulary": summary["vocabulary"],
                     "train_images": summary["train_images"], "cache_file": str(cache_file) if cache_file else None,
                     "trained_now": trained_now,
                     "features": f"penultimate layer ({net.embed[-2].out_features}) of a CNN trained on this dataset"}

    def _outputs(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)

    @classmethod
    def for_dataset(cls, dataset, settings: DataFeatureSettings | None = None, cache_dir: str | Path | None = None,
                    device: str | torch.device = "cpu") -> "DataFeatureNetwork":
        """Load the cached network of ``dataset`` (an :class:`~ldm.data.ImageCaptionDataset`, all of whose images and
        captions train it), or train and cache it. ``cache_dir`` None: train without caching."""
        records = list(dataset.records)
        if len(records) < 2:
            raise ValueError(f"the dataset in {str(dataset.root)!r} has {len(records)} image(s); the dataset feature "
                             "network needs at least 2 (and FD/KID many more)")
        settings = settings or DataFeatureSettings.for_image_size(dataset.image_size)
        key = fingerprint(CACHE_FORMAT, CACHE_VERSION, settings.to_dict(), dataset.image_size,
                          file_signature(dataset.root, [r.path for r in records]), [r.captions for r in records])
        cache_file = Path(cache_dir).expanduser() / f"{key}.safetensors" if cache_dir is not None else None
        if cache_file is not None and cache_file.is_file():
            loaded = _load_cached(cache_file, key, device)
            if loaded is not None:
                return cls(*loaded, cache_file=cache_file, trained_now=False)
        picks = range(len(records))
        if len(records) > settings.max_images:  # load only what training will use
            g = torch.Generator().manual_seed(settings.seed)
            picks = torch.randperm(len(records), generator=g)[: settings.max_images].sort().values.tolist()
        images = _load_resized(dataset, list(picks), settings.input_size).to(device)
        captions = [records[i].captions for i in picks]
        log.info("training the dataset feature network on %d images of %s", len(images), dataset.root)
        net, summary = train_data_feature_net(images, captions, settings)
        if cache_file is not None:
            _save_cached(cache_file, key, net, summary, settings)
        return cls(net, summary, cache_file=cache_file, trained_now=True)


def _load_resized(dataset, indices: list[int], size: int, chunk: int = 64) -> torch.Tensor:
    """Images ``indices`` of ``dataset`` at the network's input size, resized chunk by chunk (a large dataset of large
    images never sits in memory at full size)."""
    import torch.nn.functional as F

    parts = []
    for start in range(0, len(indices), chunk):
        x = torch.stack([dataset.image(i) for i in indices[start : start + chunk]])
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        parts.append(x)
    return torch.cat(parts)


def _save_cached(path: Path, key: str, net: DataFeatureNet, summary: dict, settings: DataFeatureSettings) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "fingerprint": key,
            "settings": json.dumps(settings.to_dict()), "summary": json.dumps(summary),
            "outputs": str(net.head.out_features)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_cached(path: Path, key: str, device) -> tuple[DataFeatureNet, dict] | None:
    """The cached network, or None (logged) when the file is damaged or not this network: it is then retrained."""
    from ldm.formats.weights import open_safetensors

    try:
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != key or meta.get("version") != str(CACHE_VERSION):
            raise ValueError("written for other data or settings")
        settings = DataFeatureSettings(**json.loads(meta["settings"]))
        net = DataFeatureNet(settings.input_size, settings.width, settings.feature_dim, int(meta["outputs"]))
        net.load_state_dict(state)
        return net.to(device).eval().requires_grad_(False), json.loads(meta["summary"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.warning("ignoring the cached feature network %s (%s); training a new one", path, str(exc).splitlines()[0])
        return None


def build_feature_network(dataset, inception_weights: str | Path | None = None, cache_dir: str | Path | None = None,
                          device: str | torch.device = "cpu", settings: DataFeatureSettings | None = None) -> FeatureNetwork:
    """FID's Inception-v3 when ``inception_weights`` is given, else the network trained on ``dataset`` (cached in
    ``cache_dir``)."""
    if inception_weights is not None:
        return InceptionFeatureNetwork(inception_weights, device)
    return DataFeatureNetwork.for_dataset(dataset, settings, cache_dir, device)
