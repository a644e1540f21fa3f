"""Data layer: captioned image folders, built-in datasets, transforms, caches, shards and the DataModules.

Names load on first use (PEP 562), so ``ldm.data.images`` and the other plain modules import without Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BUILTIN_DATASETS": "builtin",
    "prepare_builtin": "builtin",
    "ImageCaptionDataModule": "datamodule",
    "ImageCaptionDataset": "dataset",
    "build_transform": "transforms",
    "BadImageError": "images",
    "ImageTooLargeError": "images",
    "load_rgb": "images",
    "PrecomputedLatentsDataset": "precomputed",
    "PrecomputedLatentsDataModule": "precomputed_datamodule",
    "ImageRecord": "records",
    "BadMetadataError": "records",
    "OutsideDatasetError": "records",
    "scan_records": "scan",
    "discover_records": "sources",
    "split_records": "split",
    "StreamingImageCaptionDataModule": "streaming",
    "StreamingImageCaptionDataset": "streaming",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldm.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
