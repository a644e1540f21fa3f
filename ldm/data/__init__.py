"""Data layer: captioned image folders, built-in datasets, transforms and the DataModule."""

from ldm.data.builtin import BUILTIN_DATASETS, prepare_builtin
from ldm.data.datamodule import ImageCaptionDataModule
from ldm.data.dataset import ImageCaptionDataset, build_transform
from ldm.data.images import BadImageError, load_rgb
from ldm.data.precomputed import PrecomputedLatentsDataset
from ldm.data.precomputed_datamodule import PrecomputedLatentsDataModule
from ldm.data.records import ImageRecord
from ldm.data.scan import scan_records
from ldm.data.sources import discover_records
from ldm.data.split import split_records
from ldm.data.streaming import StreamingImageCaptionDataModule, StreamingImageCaptionDataset

__all__ = [
    "BUILTIN_DATASETS",
    "BadImageError",
    "ImageCaptionDataModule",
    "ImageCaptionDataset",
    "ImageRecord",
    "PrecomputedLatentsDataModule",
    "PrecomputedLatentsDataset",
    "StreamingImageCaptionDataModule",
    "StreamingImageCaptionDataset",
    "build_transform",
    "discover_records",
    "load_rgb",
    "prepare_builtin",
    "scan_records",
    "split_records",
]
