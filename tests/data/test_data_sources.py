"""Record discovery: metadata.jsonl, CSV, sidecar captions, auto-detection and path safety."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from ldm.data.records import safe_relative_path
from ldm.data.sources import detect_format, discover_records


def _image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_string_and_list_captions_and_extra_keys(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a red square", "split": "train"})
        + "\n\n   \n"
        + json.dumps(
            {"file_name": "sub/b.jpg", "text": ["one", "two"], "attributes": {"n": 2}, "label": 7}
        )
        + "\n",
        encoding="utf-8",
    )
    records = discover_records(tmp_path)
    assert [r.path for r in records] == ["a.png", "sub/b.jpg"]
    assert records[0].captions == ["a red square"]
    assert records[0].metadata == {"split": "train"}
    assert records[1].captions == ["one", "two"]
    assert records[1].metadata == {"attributes": {"n": 2}, "label": 7}


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "ok"}\n\n{"file_name": "b.png", "text": \n',
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 3"):
        discover_records(tmp_path)


@pytest.mark.parametrize(
    "row", [{"text": "no file name"}, {"file_name": "a.png", "text": 5}, ["a.png", "x"]]
)
def test_jsonl_invalid_rows(tmp_path, row):
    _jsonl(tmp_path / "metadata.jsonl", [row])
    with pytest.raises(ValueError, match="line 1"):
        discover_records(tmp_path)


def test_csv_merges_rows_of_the_same_image(tmp_path):
    (tmp_path / "metadata.csv").write_text(
        "file_name,text,source\n"
        "x.png,a cat,web\n"
        "y.png,a dog,scan\n"
        'x.png,"a cat, sitting",web\n'
        "z.png,,web\n",
        encoding="utf-8",
    )
    records = discover_records(tmp_path)
    assert [r.path for r in records] == ["x.png", "y.png", "z.png"]
    assert records[0].captions == ["a cat", "a cat, sitting"]
    assert records[0].metadata == {"source": "web"}
    assert records[1].captions == ["a dog"]
    assert records[2].captions == []


def test_csv_alias_and_custom_columns_and_explicit_file(tmp_path):
    (tmp_path / "metadata.csv").write_text("image,caption\na.png,from aliases\n", encoding="utf-8")
    assert discover_records(tmp_path)[0].captions == ["from aliases"]
    (tmp_path / "mine.csv").write_text("path,prompt\nb.png,custom\n", encoding="utf-8")
    records = discover_records(tmp_path, csv_file="mine.csv", image_column="path",
                               caption_column="prompt")
    assert [(r.path, r.captions) for r in records] == [("b.png", ["custom"])]
    with pytest.raises(ValueError, match="no image column 'path'"):
        discover_records(tmp_path, image_column="path")  # metadata.csv has no "path" column
    with pytest.raises(ValueError, match="no caption column 'prompt'"):
        discover_records(tmp_path, caption_column="prompt")
    with pytest.raises(FileNotFoundError, match="other.csv"):
        discover_records(tmp_path, csv_file="other.csv")


def test_sidecar_txt_caption_multiline_nested_and_uppercase(tmp_path, caplog):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first caption\n\nsecond caption\n", encoding="utf-8")
    _image(tmp_path / "deep" / "er" / "B.JPG")
    (tmp_path / "deep" / "er" / "B.caption").write_text("from .caption\n", encoding="utf-8")
    _image(tmp_path / "c.webp")  # no sidecar
    _image(tmp_path / ".hidden" / "d.png")
    (tmp_path / "notes.txt").write_text("not a caption of anything", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="ldm.data.sources"):
        records = discover_records(tmp_path)
    by_path = {r.path: r.captions for r in records}
    assert by_path == {
        "a.png": ["first caption", "second caption"],
        "c.webp": [],
        "deep/er/B.JPG": ["from .caption"],
    }
    assert "1 of 3 images" in caplog.text and "c.webp" in caplog.text


def test_auto_detection_order(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sidecar", encoding="utf-8")
    assert detect_format(tmp_path) == "sidecar"
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,csv\n", encoding="utf-8")
    assert detect_format(tmp_path) == "csv"
    assert discover_records(tmp_path)[0].captions == ["csv"]
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "jsonl"}])
    assert detect_format(tmp_path) == "jsonl"
    assert discover_records(tmp_path)[0].captions == ["jsonl"]
    # an explicit csv_file beats the detected layout
    assert discover_records(tmp_path, csv_file="metadata.csv")[0].captions == ["csv"]


def test_folder_without_any_layout_explains_the_layouts(tmp_path):
    (tmp_path / "readme.md").write_text("hi", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as info:
        discover_records(tmp_path)
    message = str(info.value)
    assert "metadata.jsonl" in message and "metadata.csv" in message and ".txt" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_records(tmp_path / "missing")


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
@pytest.mark.parametrize("bad", ["../secret.png", "images/../../secret.png", "ABSOLUTE"])
def test_paths_outside_the_root_are_rejected(tmp_path, layout, bad):
    root = tmp_path / "dataset"
    _image(root / "images" / "ok.png")
    _image(tmp_path / "secret.png")  # a real, readable image: only the path check can stop it
    if bad == "ABSOLUTE":
        bad = str(tmp_path / "secret.png")
    if layout == "jsonl":
        _jsonl(root / "metadata.jsonl", [{"file_name": "images/ok.png"}, {"file_name": bad}])
        source = "metadata.jsonl"
    else:
        (root / "metadata.csv").write_text(f"file_name,text\n{bad},x\n", encoding="utf-8")
        source = "metadata.csv"
    with pytest.raises(ValueError) as info:
        discover_records(root)
    assert source in str(info.value) and bad in str(info.value)


def test_safe_relative_path_normalises_inside_paths():
    assert safe_relative_path("images/../a.png", "m") == "a.png"
    assert safe_relative_path("./x//y.png", "m") == "x/y.png"
    assert safe_relative_path("dir\\z.png", "m") == "dir/z.png"
    for bad in ("", "..", ".", "/etc/passwd", "C:/x.png", "..\\x.png"):
        with pytest.raises(ValueError):
            safe_relative_path(bad, "m")
