"""Built-in datasets: digits and shapes, written in the metadata.jsonl layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm.data import builtin
from ldm.data.builtin import is_prepared, prepare_builtin
from ldm.data.builtin.shapes import BACKGROUNDS, COLORS, POSITION_PHRASES, RELATIONS
from ldm.data.sources import discover_records

INVERSE_PHRASES = {
    "left of": "to the right of",
    "right of": "to the left of",
    "above": "below",
    "below": "above",
}
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _rows(folder):
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return prepare_builtin("digits", tmp_path_factory.mktemp("builtin") / "digits")


def test_digits_are_all_written_with_exact_first_captions(digits_dir):
    rows = _rows(digits_dir)
    assert len(rows) == 1797
    assert len(list((digits_dir / "images").glob("*.png"))) == 1797
    assert rows[42]["file_name"] == "images/00042.png"
    for row in rows:
        d = row["label"]
        assert row["text"][0] == f"a handwritten digit {d}"
        assert len(row["text"]) >= 4
        assert any(DIGIT_WORDS[d] in caption for caption in row["text"][1:])
    assert {row["label"] for row in rows} == set(range(10))
    records = discover_records(digits_dir)  # readable through the ordinary user path
    assert len(records) == 1797 and records[0].metadata["label"] == rows[0]["label"]


def test_digit_images_are_the_real_digits_upscaled(digits_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in (0, 500, 1796):
        img = Image.open(digits_dir / f"images/{i:05d}.png")
        assert img.mode == "RGB" and img.size == (32, 32)
        pixels = np.asarray(img).astype(np.float64)
        assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey: white strokes on black
        pooled = pixels[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
        correlation = np.corrcoef(pooled.ravel(), digits.images[i].ravel())[0, 1]
        assert correlation > 0.9
        assert pooled.max() > 150  # bright strokes


def test_digits_split_is_deterministic_and_covers_every_class(digits_dir, tmp_path):
    rows = _rows(digits_dir)
    val = [r for r in rows if r["split"] == "validation"]
    train = [r for r in rows if r["split"] == "train"]
    assert 150 <= len(val) <= 200 and len(train) + len(val) == 1797
    assert {r["label"] for r in val} == set(range(10))
    again = prepare_builtin("digits", tmp_path / "again")
    assert (again / "metadata.jsonl").read_bytes() == (digits_dir / "metadata.jsonl").read_bytes()


def test_second_prepare_is_a_no_op(digits_dir, monkeypatch):
    stamp = (digits_dir / "metadata.jsonl").stat().st_mtime_ns

    from ldm.data.builtin import digits

    def must_not_run(*args, **kwargs):
        raise AssertionError("dataset written again")

    monkeypatch.setattr(digits, "save_png", must_not_run)
    assert prepare_builtin("digits", digits_dir) == digits_dir
    assert (digits_dir / "metadata.jsonl").stat().st_mtime_ns == stamp


def test_crash_midway_leaves_no_metadata_and_is_redone(tmp_path, monkeypatch):
    from ldm.data.builtin import shapes

    real_save, calls = shapes.save_png, []

    def crash_on_third(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        real_save(image, path)

    monkeypatch.setattr(shapes, "save_png", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_builtin("shapes", tmp_path / "shapes", num_images=5)
    assert not is_prepared(tmp_path / "shapes")
    assert not list((tmp_path / "shapes").rglob("*.tmp"))
    monkeypatch.setattr(shapes, "save_png", real_save)
    prepare_builtin("shapes", tmp_path / "shapes", num_images=5)
    assert len(_rows(tmp_path / "shapes")) == 5


def test_unknown_name_and_option_and_conflicting_folder(tmp_path):
    with pytest.raises(ValueError, match="digits.*shapes"):
        prepare_builtin("mnist", tmp_path / "x")
    with pytest.raises(ValueError, match="num_images"):
        prepare_builtin("digits", tmp_path / "x", num_images=3)
    prepare_builtin("shapes", tmp_path / "s", num_images=3)
    with pytest.raises(ValueError, match="already holds"):
        prepare_builtin("shapes", tmp_path / "s", num_images=4)
    # the same options, spelled out, are not a conflict
    assert builtin.prepare_builtin("shapes", tmp_path / "s", num_images=3, seed=0).is_dir()


def test_a_folder_prepared_before_a_writer_option_existed_is_read_as_that_options_default(tmp_path):
    folder = prepare_builtin("mirrored_digits", tmp_path / "m", per_digit=2)
    info = json.loads((folder / "builtin.json").read_text())
    del info["options"]["mirrored_caption_dropout"]  # as written before the option existed (default None)
    (folder / "builtin.json").write_text(json.dumps(info))
    assert prepare_builtin("mirrored_digits", folder, per_digit=2) == folder
    with pytest.raises(ValueError, match="already holds"):
        prepare_builtin("mirrored_digits", folder, per_digit=2, mirrored_caption_dropout=0.05)


def _shape_files(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "images").glob("*.png"))}


def test_shapes_same_seed_identical_other_seed_different(tmp_path):
    a = prepare_builtin("shapes", tmp_path / "a", num_images=30, seed=0)
    b = prepare_builtin("shapes", tmp_path / "b", num_images=30, seed=0)
    c = prepare_builtin("shapes", tmp_path / "c", num_images=30, seed=1)
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    assert _shape_files(a) == _shape_files(b)
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()
    assert _shape_files(a) != _shape_files(c)


@pytest.fixture(scope="module")
def shapes_rows(tmp_path_factory):
    folder = prepare_builtin("shapes", tmp_path_factory.mktemp("shapes") / "shapes",
                             num_images=200, seed=0)
    return folder, _rows(folder)


def test_shapes_variety_and_split(shapes_rows):
    _, rows = shapes_rows
    shapes = [s for row in rows for s in row["attributes"]["shapes"]]
    assert {s["shape"] for s in shapes} == {"circle", "square", "triangle"}
    assert len({s["color"] for s in shapes}) >= 6
    assert {s["size"] for s in shapes} == {"small", "large"}
    assert {s["position"] for s in shapes} == {"left", "right", "top", "bottom", "center"}
    assert {r["attributes"]["relation"] for r in rows} == {None, *RELATIONS}
    assert {r["attributes"]["background"] for r in rows} == set(BACKGROUNDS)
    splits = [r["split"] for r in rows]
    assert 0 < splits.count("validation") < splits.count("train")


def test_shape_captions_match_attributes(shapes_rows):
    _, rows = shapes_rows
    for row in rows:
        attributes, caption = row["attributes"], row["text"][0]
        shapes = attributes["shapes"]
        for shape in shapes:
            assert f"{shape['size']} {shape['color']} {shape['shape']}" in caption
        if len(shapes) == 1:
            assert attributes["relation"] is None
            assert caption.endswith(POSITION_PHRASES[shapes[0]["position"]])
            plain = f"{shapes[0]['color']} {shapes[0]['shape']}"
            assert any(t.endswith(plain) and len(t.split()) == 3 for t in row["text"])
        else:
            a, b = shapes
            phrase = RELATIONS[attributes["relation"]][0]
            first = f"{a['size']} {a['color']} {a['shape']}"
            second = f"{b['size']} {b['color']} {b['shape']}"
            assert f"{first} {phrase} " in caption and caption.endswith(second)
            assert (a["color"], a["shape"]) != (b["color"], b["shape"])
            inverse = INVERSE_PHRASES[attributes["relation"]]
            assert any(
                f"{b['color']} {b['shape']} {inverse} " in t and t.endswith(f"{a['shape']}")
                for t in row["text"][1:]
            )


def test_shape_geometry_follows_the_attributes(shapes_rows):
    folder, rows = shapes_rows
    for row in rows:
        attributes = row["attributes"]
        pixels = np.asarray(Image.open(folder / row["file_name"]))
        assert pixels.shape == (32, 32, 3)
        boxes = [s["bbox"] for s in attributes["shapes"]]
        for shape, (x0, y0, x1, y1) in zip(attributes["shapes"], boxes):
            assert 0 <= x0 < x1 <= 31 and 0 <= y0 < y1 <= 31
            centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            assert tuple(centre) == COLORS[shape["color"]], row
        free = np.ones((32, 32), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            free[max(y0 - 1, 0): y1 + 2, max(x0 - 1, 0): x1 + 2] = False
        assert (pixels[free] == BACKGROUNDS[attributes["background"]]).all()
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            assert {
                "left of": ax1 < bx0, "right of": bx1 < ax0, "above": ay1 < by0, "below": by1 < ay0
            }[attributes["relation"]]


def test_shapes_at_64_pixels(tmp_path):
    folder = prepare_builtin("shapes", tmp_path / "s64", image_size=64, num_images=12)
    for row in _rows(folder):
        img = Image.open(folder / row["file_name"])
        assert img.size == (64, 64)
        for shape in row["attributes"]["shapes"]:
            x0, y0, x1, y1 = shape["bbox"]
            assert 0 <= x0 < x1 <= 63 and 0 <= y0 < y1 <= 63
            expected = 0.4375 * 64 if shape["size"] == "large" else 0.25 * 64
            assert x1 - x0 + 1 == expected
            centre = img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
            assert centre == COLORS[shape["color"]]


@pytest.fixture(scope="module")
def mirrored_dir(tmp_path_factory):
    return prepare_builtin("mirrored_digits", tmp_path_factory.mktemp("mirrored") / "mirrored_digits")


def test_mirrored_digits_are_written_with_captions_and_only_asymmetric_digits(mirrored_dir):
    from ldm.data.builtin.mirrored_digits import MIRRORED_DIGITS

    all_rows = _rows(mirrored_dir)
    rows = [r for r in all_rows if r["mirrored"]]
    normal = [r for r in all_rows if not r["mirrored"]]
    assert MIRRORED_DIGITS == (2, 3, 4, 5, 6, 7, 9)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "validation"]
    assert len(train) == 7 * 30 and len(val) == 7 * 4  # every 10th of the first 34 of each digit
    assert len(list((mirrored_dir / "images").glob("*.png"))) == len(all_rows)
    for d in MIRRORED_DIGITS:
        assert sum(r["label"] == d for r in train) == 30 and sum(r["label"] == d for r in val) == 4
    for row in rows:
        d = row["label"]
        assert row["file_name"] == f"images/{row['source_index']:05d}.png"
        assert row["text"][0] == f"a mirrored digit {d}"
        assert len(row["text"]) >= 4 and len(set(row["text"])) == len(row["text"])
        assert all(str(d) in t or DIGIT_WORDS[d] in t for t in row["text"])
        assert all("mirror" in t or "flipped" in t for t in row["text"])
        assert "caption_dropout" not in row  # by default every row at the training's cond_dropout
    # Regularisation images: the same source digits unflipped, with the plain digits captions.
    assert sorted((r["source_index"], r["split"]) for r in normal) == sorted((r["source_index"], r["split"]) for r in rows)
    for row in normal:
        assert "caption_dropout" not in row
        assert row["file_name"] == f"images/{row['source_index']:05d}-normal.png"
        assert row["text"][0] == f"a handwritten digit {row['label']}"
        assert not any("mirror" in t or "flipped" in t for t in row["text"])
    records = discover_records(mirrored_dir)  # readable through the ordinary user path
    assert len(records) == len(all_rows) and records[0].metadata["mirrored"] is True


def test_mirrored_digit_images_are_the_real_digits_flipped(mirrored_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = _rows(mirrored_dir)
    for row in rows[::20]:
        if not row["mirrored"]:
            continue
        source = digits.images[row["source_index"]]
        assert digits.target[row["source_index"]] == row["label"]
        img = Image.open(mirrored_dir / row["file_name"])
        assert img.mode == "RGB" and img.size == (32, 32)
        pixels = np.asarray(img).astype(np.float64)
        assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey: white strokes on black
        pooled = pixels[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
        flipped = np.corrcoef(pooled.ravel(), source[:, ::-1].ravel())[0, 1]
        unflipped = np.corrcoef(pooled.ravel(), source.ravel())[0, 1]
        assert flipped > 0.9 and flipped > unflipped + 0.1, (row, flipped, unflipped)
        assert pooled.max() > 150  # bright strokes


def test_mirrored_digits_are_deterministic_and_sized_by_options(mirrored_dir, tmp_path):
    again = prepare_builtin("mirrored_digits", tmp_path / "again")
    assert (again / "metadata.jsonl").read_bytes() == (mirrored_dir / "metadata.jsonl").read_bytes()
    assert _shape_files(again) == _shape_files(mirrored_dir)
    small = prepare_builtin("mirrored_digits", tmp_path / "small", per_digit=3, image_size=16)
    rows = _rows(small)
    assert sum(r["split"] == "train" for r in rows) == 2 * 21 and len(rows) == 2 * 28  # mirrored + normal
    only_mirrored = _rows(prepare_builtin("mirrored_digits", tmp_path / "only", per_digit=3, normal_per_digit=0))
    assert len(only_mirrored) == 28 and all(r["mirrored"] for r in only_mirrored)
    assert Image.open(small / rows[0]["file_name"]).size == (16, 16)
    with pytest.raises(ValueError, match="per_digit"):
        prepare_builtin("mirrored_digits", tmp_path / "bad", per_digit=0)
    own = _rows(prepare_builtin("mirrored_digits", tmp_path / "own_rate", per_digit=3, mirrored_caption_dropout=0.05))
    assert [r.get("caption_dropout") for r in own] == [0.05 if r["mirrored"] else None for r in own]
    with pytest.raises(ValueError, match="mirrored_caption_dropout"):
        prepare_builtin("mirrored_digits", tmp_path / "bad_rate", per_digit=3, mirrored_caption_dropout=1.5)
