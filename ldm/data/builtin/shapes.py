"""Built-in dataset: procedurally drawn coloured shapes with compositional captions.

Each image holds one shape (``"a small red circle on the left"``) or two shapes in a spatial
relation (``"a blue square above a green triangle"``) on a plain black or gray background. The
ground truth is stored in the metadata under ``attributes`` so an evaluation can check that a
generated image follows its prompt::

    {"background": "gray",
     "shapes": [{"shape": "square", "color": "blue", "size": "large", "position": "top",
                 "bbox": [x0, y0, x1, y1]}, ...],
     "relation": "above"}          # shapes[0] relative to shapes[1]; null for one shape

``bbox`` is inclusive pixel coordinates. Shapes are drawn at 4x and box-downsampled, so edges
are smooth while interiors have exactly the colour in `COLORS`. The same seed gives
byte-identical files; every 10th image is in the validation split.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ldm.data.builtin._io import save_png

__all__ = ["BACKGROUNDS", "COLORS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "write_shapes"]

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 30),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 20),
    "purple": (150, 40, 200),
    "orange": (255, 140, 0),
    "white": (250, 250, 250),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (120, 120, 120)}
SIZES: dict[str, float] = {"small": 0.25, "large": 0.4375}  # side length / image size
POSITIONS: dict[str, tuple[float, float]] = {  # shape centre / image size
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# relation of shapes[0] to shapes[1]: (caption phrase, position of shapes[0], of shapes[1])
RELATIONS: dict[str, tuple[str, str, str]] = {
    "left of": ("to the left of", "left", "right"),
    "right of": ("to the right of", "right", "left"),
    "above": ("above", "top", "bottom"),
    "below": ("below", "bottom", "top"),
}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SUPERSAMPLE = 4
VALIDATION_EVERY = 10
_JITTER_TRIES = 10


def write_shapes(
    out_dir: Path, image_size: int = 32, num_images: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Draw the shape images under ``out_dir/images/`` and return their metadata rows.

    Args:
        out_dir: Dataset folder.
        image_size: Height and width in pixels (32 by default; 64 works too).
        num_images: How many images to draw.
        seed: Random seed; the same seed gives byte-identical images and metadata.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 for shapes, got {image_size}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    rng = random.Random(seed)
    rows = []
    for i in range(num_images):
        attributes = _sample_scene(rng, image_size)
        file_name = f"images/{i:05d}.png"
        save_png(_draw(attributes, image_size), out_dir / file_name)
        rows.append(
            {
                "file_name": file_name,
                "text": _captions(attributes),
                "attributes": attributes,
                "split": "validation" if i % VALIDATION_EVERY == 0 else "train",
            }
        )
    return rows


def _sample_scene(rng: random.Random, image_size: int) -> dict[str, Any]:
    background = rng.choice(sorted(BACKGROUNDS))
    if rng.random() < 0.5:
        shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
        position = rng.choice(list(POSITIONS))
        box = _place(rng, image_size, size, position)
        shapes = [_shape_dict(shape, color, size, position, box)]
        return {"background": background, "shapes": shapes, "relation": None}
    first = (rng.choice(SHAPES), rng.choice(list(COLORS)))
    second = first
    while second == first:  # two identical shapes would make the caption ambiguous
        second = (rng.choice(SHAPES), rng.choice(list(COLORS)))
    sizes = (rng.choice(list(SIZES)), rng.choice(list(SIZES)))
    relation = rng.choice(list(RELATIONS))
    _, pos_a, pos_b = RELATIONS[relation]
    for attempt in range(_JITTER_TRIES + 1):
        jitter = attempt < _JITTER_TRIES  # last resort: the anchors themselves never overlap
        box_a = _place(rng, image_size, sizes[0], pos_a, jitter)
        box_b = _place(rng, image_size, sizes[1], pos_b, jitter)
        if _separated(box_a, box_b):
            break
    else:  # pragma: no cover - guarded by the geometry of SIZES and POSITIONS
        raise AssertionError("could not place two shapes without overlap")
    shapes = [
        _shape_dict(*first, sizes[0], pos_a, box_a),
        _shape_dict(*second, sizes[1], pos_b, box_b),
    ]
    return {"background": background, "shapes": shapes, "relation": relation}


def _shape_dict(shape: str, color: str, size: str, position: str, box: list[int]) -> dict:
    return {"shape": shape, "color": color, "size": size, "position": position, "bbox": box}


def _place(
    rng: random.Random, image_size: int, size: str, position: str, jitter: bool = True
) -> list[int]:
    """Inclusive pixel box of a shape, centred on its anchor plus a small random offset."""
    side = max(3, round(SIZES[size] * image_size))
    max_jitter = max(1, image_size // 16) if jitter else 0
    fx, fy = POSITIONS[position]
    corners = []
    for frac in (fx, fy):
        start = round(frac * image_size - side / 2) + rng.randint(-max_jitter, max_jitter)
        corners.append(min(max(start, 0), image_size - side))
    x0, y0 = corners
    return [x0, y0, x0 + side - 1, y0 + side - 1]


def _separated(a: list[int], b: list[int], gap: int = 1) -> bool:
    """True when the boxes are at least ``gap`` empty pixels apart horizontally or vertically."""
    return (
        a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]
    )


def _draw(attributes: dict[str, Any], image_size: int) -> Image.Image:
    k = SUPERSAMPLE
    background = BACKGROUNDS[attributes["background"]]
    canvas = Image.new("RGB", (image_size * k, image_size * k), background)
    draw = ImageDraw.Draw(canvas)
    for shape in attributes["shapes"]:
        x0, y0, x1, y1 = shape["bbox"]
        box = (x0 * k, y0 * k, (x1 + 1) * k - 1, (y1 + 1) * k - 1)
        fill = COLORS[shape["color"]]
        if shape["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif shape["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:  # triangle pointing up
            apex = ((box[0] + box[2]) / 2, box[1])
            draw.polygon([(box[0], box[3]), (box[2], box[3]), apex], fill=fill)
    return canvas.reduce(k)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: dict[str, Any], with_size: bool) -> str:
    words = f"{shape['color']} {shape['shape']}"
    if with_size:
        words = f"{shape['size']} {words}"
    return f"{_article(words)} {words}"


def _captions(attributes: dict[str, Any]) -> list[str]:
    """Phrasings of a scene, the most specific first."""
    shapes = attributes["shapes"]
    if len(shapes) == 1:
        where = POSITION_PHRASES[shapes[0]["position"]]
        return [
            f"{_noun(shapes[0], True)} {where}",
            f"{_noun(shapes[0], False)} {where}",
            _noun(shapes[0], True),
            _noun(shapes[0], False),
        ]
    a, b = shapes
    phrase = RELATIONS[attributes["relation"]][0]
    inverse = RELATIONS[INVERSE[attributes["relation"]]][0]
    return [
        f"{_noun(a, True)} {phrase} {_noun(b, True)}",
        f"{_noun(a, False)} {phrase} {_noun(b, False)}",
        f"{_noun(b, False)} {inverse} {_noun(a, False)}",
        f"{_noun(b, True)} {inverse} {_noun(a, True)}",
    ]
