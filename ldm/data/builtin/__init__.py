"""Built-in datasets, written to disk in the same ``metadata.jsonl`` layout users provide.

``prepare_builtin("digits", "data/digits")`` writes ``images/*.png`` and then, last and
atomically, ``metadata.jsonl``. A folder that already has its ``metadata.jsonl`` is complete and
is not written again; a run that crashed half-way left no ``metadata.jsonl`` and is redone.
The options used are recorded in ``builtin.json`` so a folder prepared with other options is
reported instead of silently reused.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldm.data.builtin._io import atomic_write_bytes, write_jsonl
from ldm.data.builtin.digits import write_digits
from ldm.data.builtin.mirrored_digits import write_mirrored_digits
from ldm.data.builtin.shapes import write_shapes

__all__ = ["BUILTIN_DATASETS", "is_prepared", "prepare_builtin"]

log = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"
INFO_NAME = "builtin.json"

# name -> writer(out_dir: Path, **options) that writes the images and returns the metadata rows
BUILTIN_DATASETS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "digits": write_digits,
    "mirrored_digits": write_mirrored_digits,
    "shapes": write_shapes,
}


def is_prepared(out_dir: str | os.PathLike[str]) -> bool:
    """True when ``out_dir`` holds a completely written dataset (its metadata.jsonl exists).

    Args:
        out_dir: Dataset folder.
    """
    return (Path(out_dir) / METADATA_NAME).is_file()


def prepare_builtin(name: str, out_dir: str | os.PathLike[str], **options: Any) -> Path:
    """Write a built-in dataset to ``out_dir`` unless it is already there.

    Args:
        name: One of `BUILTIN_DATASETS` (``"digits"``, ``"mirrored_digits"``, ``"shapes"``).
        out_dir: Dataset folder to create (e.g. ``data/digits``).
        **options: Options of the dataset writer, e.g. ``image_size=64, num_images=500, seed=1``
            for shapes.

    Returns:
        ``out_dir`` as a Path, ready for `discover_records`.

    Raises:
        ValueError: Unknown name, unknown option, or ``out_dir`` was prepared with other options.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"unknown built-in dataset {name!r}; available: {', '.join(sorted(BUILTIN_DATASETS))}"
        )
    writer = BUILTIN_DATASETS[name]
    resolved = _resolve_options(name, writer, options)
    out_dir = Path(out_dir)
    info = {"name": name, "options": resolved}
    if is_prepared(out_dir):
        _check_same_options(out_dir, info)
        log.debug("built-in dataset %r already prepared in %s", name, out_dir)
        return out_dir
    log.info("preparing built-in dataset %r in %s", name, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = writer(out_dir, **resolved)
    atomic_write_bytes(out_dir / INFO_NAME, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    write_jsonl(out_dir / METADATA_NAME, rows)  # written last: its presence means "complete"
    log.info("wrote %d images of %r to %s", len(rows), name, out_dir)
    return out_dir


def _resolve_options(name: str, writer: Callable[..., Any], options: dict[str, Any]) -> dict:
    parameters = list(inspect.signature(writer).parameters.values())[1:]  # skip out_dir
    known = {p.name: p.default for p in parameters}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"built-in dataset {name!r} has no option(s) {unknown}; options: {sorted(known)}"
        )
    return {**known, **options}


def _check_same_options(out_dir: Path, info: dict[str, Any]) -> None:
    info_path = out_dir / INFO_NAME
    if not info_path.is_file():
        return
    stored = json.loads(info_path.read_text(encoding="utf-8"))
    if stored.get("name") == info["name"] and isinstance(stored.get("options"), dict):
        # An option added to the writer after this folder was prepared: it was written as that option's default.
        defaults = _resolve_options(info["name"], BUILTIN_DATASETS[info["name"]], {})
        stored = {**stored, "options": {**{k: v for k, v in defaults.items() if k not in stored["options"]}, **stored["options"]}}
    if stored != info:
        raise ValueError(
            f"{str(out_dir)!r} already holds built-in dataset {stored.get('name')!r} prepared "
            f"with {stored.get('options')}, not {info['name']!r} with {info['options']}; "
            "delete the folder or choose another one"
        )
