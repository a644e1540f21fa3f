"""Deterministic train/validation split of dataset records.

A record's ``split`` metadata (``train`` / ``validation``, ``val``, ``valid``, ``test``) decides
where it goes. Records without one are assigned by a stable hash of their relative path, so the
split depends neither on file order nor on which other files exist: adding images never moves an
existing image between train and validation.
"""

from __future__ import annotations

import hashlib

from ldm.data.records import ImageRecord

__all__ = ["TRAIN_SPLITS", "VALIDATION_SPLITS", "path_hash_fraction", "split_records"]

TRAIN_SPLITS = frozenset({"train"})
VALIDATION_SPLITS = frozenset({"validation", "val", "valid", "test"})


def path_hash_fraction(path: str) -> float:
    """Map a relative path to a number in [0, 1), the same on every machine and run.

    Args:
        path: Relative image path (as stored in `ImageRecord.path`).
    """
    digest = hashlib.sha1(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_records(
    records: list[ImageRecord], val_fraction: float
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split records into (train, validation), keeping their order within each part.

    Records whose metadata has a ``split`` key follow it. The others go to validation when
    `path_hash_fraction` of their path is below ``val_fraction``. If that leaves validation empty
    although ``val_fraction > 0`` and there are at least two hash-split records, the one with
    the smallest hash is moved to validation.

    Args:
        records: Records to split.
        val_fraction: Share of (unlabelled) records for validation, in [0, 1).

    Raises:
        ValueError: ``val_fraction`` is outside [0, 1), or a ``split`` value is not recognised.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    is_val: list[bool] = []
    hashed: list[tuple[float, int]] = []
    for i, record in enumerate(records):
        label = record.metadata.get("split")
        if label is None:
            fraction = path_hash_fraction(record.path)
            hashed.append((fraction, i))
            is_val.append(fraction < val_fraction)
        elif str(label).lower() in TRAIN_SPLITS:
            is_val.append(False)
        elif str(label).lower() in VALIDATION_SPLITS:
            is_val.append(True)
        else:
            allowed = sorted(TRAIN_SPLITS | VALIDATION_SPLITS)
            raise ValueError(
                f"image {record.path!r} has split {label!r}; expected one of {allowed}"
            )
    if val_fraction > 0 and not any(is_val) and len(hashed) >= 2:
        is_val[min(hashed)[1]] = True
    train = [r for r, v in zip(records, is_val) if not v]
    val = [r for r, v in zip(records, is_val) if v]
    return train, val
