"""The scan manifest: a second start checks only new or changed files; verify modes; rank-0 scans."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import ldm.data.scan as scan_module
from conftest import run_ddp_script, write_tiny_dataset
from ldm.data import BadImageError, ImageCaptionDataModule
from ldm.data.manifest import MANIFEST_NAME, ScanManifest
from ldm.data.scan import scan_dataset
from ldm.data.sources import discover_records

DDP_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_data_manifest.py"


def _module(root, **kwargs) -> ImageCaptionDataModule:
    options = {"image_size": 8, "val_fraction": 0.0, "scan_workers": 1, **kwargs}
    return ImageCaptionDataModule(root=str(root), **options)


def _all_paths(dm) -> list[str]:
    return sorted(r.path for r in dm.train_dataset.records + dm.val_dataset.records)


def _stored(path) -> dict:
    return json.loads(path.read_text())["files"]


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Every file that a full check decodes, by path (checks run in this process: scan_workers=1)."""
    seen: list[str] = []
    real = scan_module.load_rgb

    def counting_load_rgb(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(scan_module, "load_rgb", counting_load_rgb)
    return seen


def _forbid_opening_images(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"an image was opened: {args[:1]}")

    monkeypatch.setattr(Image, "open", refuse)


def _noise(size=(16, 16), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _half_jpeg(seed=0) -> bytes:
    buffer = io.BytesIO()
    _noise((48, 40), seed).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def _bump_mtime(path) -> None:
    later = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(later, later))


def _append_record(root, name, text) -> None:
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": name, "text": text}) + "\n")


def _drop_record(root, name) -> None:
    lines = (root / "metadata.jsonl").read_text().splitlines(keepends=True)
    (root / "metadata.jsonl").write_text("".join(l for l in lines if name not in l))


def test_first_setup_writes_the_manifest_with_results_and_sizes(tmp_path):
    root = write_tiny_dataset(tmp_path / "d", n=6, size=12)
    dm = _module(root)
    dm.setup("fit")
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["format"] == "ldm-scan-manifest" and manifest["root"] == str(root)
    files = manifest["files"]
    assert sorted(files) == [f"images/{i:03d}.png" for i in range(6)]
    for name, (size, mtime_ns, verify, reason, width, height) in files.items():
        info = (root / name).stat()
        assert (size, mtime_ns) == (info.st_size, info.st_mtime_ns)
        assert (verify, reason, width, height) == ("full", None, 12, 12)
    assert dm.image_sizes == {name: (12, 12) for name in files}
    assert not list(root.glob("*.tmp"))  # the atomic write left no temporary file behind


def test_second_setup_opens_no_image_and_does_not_rewrite(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "d", n=6)
    first = _module(root)
    first.setup("fit")
    stamp = (root / MANIFEST_NAME).stat().st_mtime_ns
    _forbid_opening_images(monkeypatch)
    second = _module(root)
    second.setup("fit")
    assert _all_paths(second) == _all_paths(first)
    assert second.image_sizes == first.image_sizes and second.skipped == []
    assert (root / MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_changed_and_new_files_are_checked_and_removed_ones_dropped(tmp_path, decoded):
    root = write_tiny_dataset(tmp_path / "d", n=5)
    _module(root).setup("fit")
    assert len(decoded) == 5
    decoded.clear()
    _noise((20, 10), seed=1).save(root / "images" / "001.png")  # different bytes and size
    _bump_mtime(root / "images" / "001.png")
    _noise(seed=2).save(root / "images" / "new.png")
    _append_record(root, "images/new.png", "a new one")
    (root / "images" / "004.png").unlink()
    _drop_record(root, "images/004.png")
    dm = _module(root)
    dm.setup("fit")
    assert sorted(decoded) == ["001.png", "new.png"]
    files = _stored(root / MANIFEST_NAME)
    assert sorted(files) == [f"images/{n}.png" for n in ("000", "001", "002", "003", "new")]
    assert files["images/001.png"][4:] == [20, 10] and dm.image_sizes["images/001.png"] == (20, 10)
    assert files["images/001.png"][0] == (root / "images" / "001.png").stat().st_size
    assert dm.skipped == []


def test_a_file_that_became_corrupt_is_skipped_counted_and_remembered(tmp_path, caplog, decoded, monkeypatch):
    root = write_tiny_dataset(tmp_path / "d", n=4)
    _module(root).setup("fit")
    bad = root / "images" / "002.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    _bump_mtime(bad)
    decoded.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data.scan"):
        dm = _module(root)
        dm.setup("fit")
    assert decoded == ["002.png"]
    assert [p for p, _ in dm.skipped] == [str(bad)] and "truncated" in dm.skipped[0][1]
    assert "skipped 1 of 4 images" in caplog.text and str(bad) in caplog.text
    assert "images/002.png" not in _all_paths(dm)
    assert "truncated" in _stored(root / MANIFEST_NAME)["images/002.png"][3]
    # the next start knows it is bad without opening anything, and still says so
    _forbid_opening_images(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data.scan"):
        again = _module(root)
        again.setup("fit")
    assert again.skipped == dm.skipped and "skipped 1 of 4 images" in caplog.text
    with pytest.raises(BadImageError) as info:
        _module(root, on_bad_file="error").setup("fit")
    assert info.value.path == str(bad) and "on_bad_file='skip'" in str(info.value)


def test_header_mode_accepts_truncated_pixels_that_full_mode_rejects(tmp_path, decoded, monkeypatch):
    # PIL reads a JPEG's size from the markers before the pixel data, so half a file opens fine
    root = tmp_path / "d"
    root.mkdir()
    _noise().save(root / "ok.png")
    (root / "ok.txt").write_text("fine")
    (root / "cut.jpg").write_bytes(_half_jpeg())
    (root / "cut.txt").write_text("pixels missing")
    (root / "text.png").write_bytes(b"I am not an image")
    (root / "text.txt").write_text("not an image")

    def no_pixel_decoding(self, *args, **kwargs):
        raise AssertionError("header mode decoded pixels")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", no_pixel_decoding)
        header = _module(root, verify="header")
        header.setup("fit")
    assert _all_paths(header) == ["cut.jpg", "ok.png"]
    assert header.image_sizes == {"cut.jpg": (48, 40), "ok.png": (16, 16)}
    assert [(os.path.basename(p), r) for p, r in header.skipped] == [
        ("text.png", "not an image file PIL can identify")
    ]
    assert decoded == []
    # a header entry does not satisfy a full check: every file is decoded now, and cut.jpg fails
    full = _module(root, verify="full")
    full.setup("fit")
    assert sorted(decoded) == ["cut.jpg", "ok.png", "text.png"]
    assert _all_paths(full) == ["ok.png"]
    reasons = {os.path.basename(p): r for p, r in full.skipped}
    assert "truncated" in reasons["cut.jpg"]
    assert {row[2] for row in _stored(root / MANIFEST_NAME).values()} == {"full"}
    # ... while the full entries satisfy a later header check without opening anything
    _forbid_opening_images(monkeypatch)
    again = _module(root, verify="header")
    again.setup("fit")
    assert _all_paths(again) == ["ok.png"] and len(again.skipped) == 2


def test_none_mode_only_checks_that_files_exist_and_are_not_empty(tmp_path, monkeypatch):
    root = tmp_path / "d"
    root.mkdir()
    _noise().save(root / "ok.png")
    (root / "text.png").write_bytes(b"I am not an image")
    (root / "empty.png").write_bytes(b"")
    lines = [{"file_name": n, "text": n} for n in ("ok.png", "text.png", "empty.png", "gone.png")]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _forbid_opening_images(monkeypatch)
    dm = _module(root, verify="none")
    dm.setup("fit")
    assert _all_paths(dm) == ["ok.png", "text.png"] and dm.image_sizes == {}
    assert sorted((os.path.basename(p), r) for p, r in dm.skipped) == [
        ("empty.png", "empty file (0 bytes)"), ("gone.png", "file not found")
    ]
    assert {name: row[2:] for name, row in _stored(root / MANIFEST_NAME).items()} == {
        "ok.png": ["none", None, None, None], "text.png": ["none", None, None, None]
    }


def test_header_size_follows_exif_orientation_like_full_decoding(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _noise((30, 10)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    (tmp_path / "rotated.txt").write_text("tall once rotated")
    records = discover_records(tmp_path)
    sizes = {
        verify: scan_dataset(tmp_path, records, verify=verify).sizes["rotated.jpg"]
        for verify in ("header", "full")
    }
    assert sizes == {"header": (10, 30), "full": (10, 30)}


def test_read_only_root_keeps_the_manifest_in_manifest_dir(tmp_path, monkeypatch, decoded):
    root = write_tiny_dataset(tmp_path / "d", n=4)
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # root ignores permission bits: say what others see
        if os.fspath(path) == str(root) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    root.chmod(0o555)
    try:
        elsewhere = tmp_path / "manifests"
        _module(root, manifest_dir=str(elsewhere)).setup("fit")
        written = list(elsewhere.iterdir())
        assert [p.name for p in written] == [ScanManifest(root, elsewhere).locations[0].name]
        assert written[0].name.startswith("d-") and len(_stored(written[0])) == 4
        decoded.clear()
        _module(root, manifest_dir=str(elsewhere)).setup("fit")
        assert decoded == []
        # without manifest_dir it goes to the user cache, never into the read-only folder
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        _module(root).setup("fit")
        cached = list((tmp_path / "cache" / "ldm" / "manifests").iterdir())
        assert len(cached) == 1 and len(_stored(cached[0])) == 4
        assert not (root / MANIFEST_NAME).exists()
    finally:
        root.chmod(0o755)


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "ldm-scan-manifest", "version": 1, "files": {"images/000.png": [1, 2',
        b"\xff\xfe\x00garbage",
        b'["a", "list"]',
        b'{"format": "ldm-scan-manifest", "version": 1, "files": {"images/000.png": [1, 2, "x"]}}',
        b'{"format": "ldm-scan-manifest", "version": 99, "files": {}}',
    ],
    ids=["cut", "binary", "wrong-type", "bad-row", "future-version"],
)
def test_a_corrupt_manifest_is_ignored_with_a_warning_and_rebuilt(tmp_path, caplog, content, decoded):
    root = write_tiny_dataset(tmp_path / "d", n=3)
    (root / MANIFEST_NAME).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="ldm.data.manifest"):
        dm = _module(root)
        dm.setup("fit")
    assert "ignoring unreadable scan manifest" in caplog.text and MANIFEST_NAME in caplog.text
    assert len(decoded) == 3 and len(_all_paths(dm)) == 3
    assert len(_stored(root / MANIFEST_NAME)) == 3  # rebuilt


def test_rank_zero_prepares_and_other_ranks_only_read(tmp_path, monkeypatch, decoded):
    root = write_tiny_dataset(tmp_path / "d", n=5)
    (root / "images" / "003.png").write_bytes(b"broken")
    rank0 = _module(root, on_bad_file="error")
    rank0.prepare_data()  # what Lightning runs on local rank 0 before the others' setup()
    assert len(decoded) == 5  # bad files are recorded here, not raised: setup() decides
    assert "images/003.png" in _stored(root / MANIFEST_NAME)
    _forbid_opening_images(monkeypatch)
    rank1 = _module(root, on_bad_file="skip")
    rank1.setup("fit")  # a rank that never ran prepare_data(): it only reads the manifest
    assert [os.path.basename(p) for p, _ in rank1.skipped] == ["003.png"]
    with pytest.raises(BadImageError, match="003.png"):
        rank0.setup("fit")


def test_setup_outside_a_trainer_scans_what_the_manifest_lacks(tmp_path, decoded):
    root = write_tiny_dataset(tmp_path / "d", n=4)
    dm = _module(root)
    dm.setup("fit")  # no prepare_data(): setup() checks and writes the manifest itself
    assert len(decoded) == 4 and len(_stored(root / MANIFEST_NAME)) == 4


def test_worker_processes_give_the_same_result_as_one_process(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "d", n=70, size=8)
    (root / "images" / "010.png").write_bytes(b"")
    (root / "images" / "020.png").write_bytes(b"not a png")
    records = discover_records(root)
    one = scan_dataset(root, records, workers=1)
    pid_log = tmp_path / "pids.txt"
    real = scan_module.check_image

    def logging_check(path, verify="full"):
        with open(pid_log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(path, verify)

    monkeypatch.setattr(scan_module, "check_image", logging_check)  # forked workers inherit it
    two = scan_dataset(root, records, workers=2)
    assert (two.good, two.skipped, two.sizes) == (one.good, one.skipped, one.sizes)
    assert len(two.skipped) == 2 and len(two.sizes) == 68
    pids = set(pid_log.read_text().split())
    assert len(pids) == 2 and str(os.getpid()) not in pids


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"verify": "fast"}, ["verify", "'full'", "'header'", "'none'"]), ({"scan_workers": 0}, ["scan_workers"])],
)
def test_scan_arguments_are_validated_early(kwargs, words):
    with pytest.raises(ValueError) as info:
        ImageCaptionDataModule(**kwargs)
    assert all(word in str(info.value) for word in words)


def test_two_process_ddp_fit_decodes_each_image_once(tmp_path):
    """A real 2-process CPU DDP fit (about 12 s): rank 0 scans in prepare_data(), rank 1 only reads."""
    run_ddp_script(DDP_SCRIPT, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["decoded"] for r in ranks] == [16, 0]
    assert all(r["skipped"] == ["005.png"] and r["train"] == 15 and r["sizes"] == 15 for r in ranks)


def test_an_unwritable_manifest_dir_warns_and_setup_still_works(tmp_path, caplog):
    root = write_tiny_dataset(tmp_path / "d", n=3)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="ldm.data.manifest"):
        dm = _module(root, manifest_dir=str(blocker / "manifests"))
        dm.setup("fit")
    assert len(_all_paths(dm)) == 3
    assert "could not write the scan manifest" in caplog.text and "manifest_dir" in caplog.text
    assert not (root / MANIFEST_NAME).exists()


def test_prepare_data_per_node_is_handed_to_lightning():
    assert ImageCaptionDataModule().prepare_data_per_node is True
    assert ImageCaptionDataModule(prepare_data_per_node=False).prepare_data_per_node is False
