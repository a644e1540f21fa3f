"""The dataset that the quality figures compare with: every readable image of a dataset, centre-cropped, first caption."""

from __future__ import annotations

from ldm.data.datamodule import ImageCaptionDataModule
from ldm.data.dataset import ImageCaptionDataset

__all__ = ["DEFAULT_FEATURE_CACHE", "evaluation_dataset", "evaluation_view"]

DEFAULT_FEATURE_CACHE = "cache/feature-nets"  # under the data folder (``--data-dir``): data/cache/feature-nets


def evaluation_dataset(data: str, data_dir: str = "data", image_size: int = 32) -> ImageCaptionDataset:
    """All readable images of ``data`` (a dataset folder or a built-in name, prepared in ``data_dir`` when missing),
    training and validation splits together in path order, as an eval-mode dataset (centre crops of
    ``image_size``; ``caption(i)`` is the first caption). Unreadable files are skipped and counted as in training."""
    dm = ImageCaptionDataModule(root=data, data_dir=data_dir, image_size=image_size, batch_size=1)
    dm.prepare_data()
    dm.setup("validate")
    return evaluation_view(dm.train_dataset, dm.val_dataset)


def evaluation_view(*datasets: ImageCaptionDataset) -> ImageCaptionDataset:
    """The images of ``datasets`` (of one folder, e.g. a DataModule's training and validation sets) together, in path
    order, as an eval-mode dataset: centre crops of their image size, no flips, first captions. The same data always
    gives the same view, so the dataset feature network's cache key matches between ``ldm evaluate quality`` and the
    training callback."""
    first = datasets[0]
    records = sorted([r for d in datasets if d is not None for r in d.records], key=lambda r: r.path)
    return ImageCaptionDataset(root=first.root, records=records, image_size=first.image_size, crop="center", train=False,
                               max_image_pixels=first.max_image_pixels)
