"""scan_records: broken and missing files are skipped with a log entry each, or refused."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldm.data.images import BadImageError
from ldm.data.scan import scan_records
from ldm.data.sources import discover_records


def _cut_noise_bytes(fmt: str) -> bytes:
    """A valid noise image in ``fmt``, cut to half its length."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, format=fmt)
    data = buffer.getvalue()
    return data[: len(data) // 2]


BAD_FILES = {
    "bad/truncated.png": _cut_noise_bytes("PNG"),
    "bad/truncated.jpg": _cut_noise_bytes("JPEG"),
    "bad/empty.png": b"",
    "bad/text.png": b"hello, I am text\n",
    "bad/random.jpg": np.random.default_rng(3).bytes(2048),
}
MISSING = "bad/missing.png"


@pytest.fixture
def dataset_with_bad_files(tmp_path):
    rows = []
    for i in range(3):
        (tmp_path / "good").mkdir(exist_ok=True)
        Image.new("RGB", (10, 10), (i * 50, 0, 0)).save(tmp_path / "good" / f"{i}.png")
        rows.append({"file_name": f"good/{i}.png", "text": f"good {i}"})
    (tmp_path / "bad").mkdir()
    for name, content in BAD_FILES.items():
        (tmp_path / name).write_bytes(content)
        rows.append({"file_name": name, "text": "bad"})
    rows.insert(2, {"file_name": MISSING, "text": "listed but absent"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_skip_drops_counts_and_logs_every_bad_file(dataset_with_bad_files, caplog):
    root = dataset_with_bad_files
    records = discover_records(root)
    assert len(records) == 9
    with caplog.at_level(logging.WARNING, logger="ldm.data.scan"):
        good, skipped = scan_records(root, records, on_bad_file="skip")
    assert [r.path for r in good] == ["good/0.png", "good/1.png", "good/2.png"]
    bad_names = [*BAD_FILES, MISSING]
    assert sorted(path for path, _ in skipped) == sorted(str(root / n) for n in bad_names)
    assert "skipped 6 of 9 images" in caplog.text
    for name in bad_names:
        assert str(root / name) in caplog.text
    reasons = dict(skipped)
    assert "not found" in reasons[str(root / MISSING)]
    assert "empty" in reasons[str(root / "bad/empty.png")]
    assert "truncated" in reasons[str(root / "bad/truncated.png")]


def test_error_mode_raises_on_the_first_bad_file(dataset_with_bad_files):
    root = dataset_with_bad_files
    with pytest.raises(BadImageError) as info:
        scan_records(root, discover_records(root), on_bad_file="error")
    assert info.value.path == str(root / MISSING)  # the first bad record in file order
    assert "on_bad_file='skip'" in str(info.value)


def test_all_bad_raises_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"not an image")
    records = discover_records(tmp_path)
    with pytest.raises(ValueError) as info:
        scan_records(tmp_path, records)
    message = str(info.value)
    assert "found 2 files, 2 bad" in message
    assert "empty file" in message and "b.png" in message


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="on_bad_file"):
        scan_records(tmp_path, [], on_bad_file="ignore")
