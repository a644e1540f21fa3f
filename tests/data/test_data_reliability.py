"""Hostile input to the data layer (issue 12, section 5): symbolic links out of the dataset folder, decompression
bombs, NUL bytes and invalid UTF-8 in metadata and caption files, a damaged latent-cache shard or precomputed chunk.
Each is refused with an error naming the input and the fix, or skipped, counted and logged (on_bad_file="skip")."""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

from ldm.data import ImageCaptionDataModule
from ldm.data.cache_shards import build_or_load_shards
from ldm.data.images import BadImageError, ImageTooLargeError, load_rgb
from ldm.data.precomputed import check_local_chunks
from ldm.data.records import BadMetadataError, OutsideDatasetError
from ldm.data.sources import discover_records


def _png(path, size=(8, 8), colour=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _jsonl(root, rows):
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _dm(root, **kwargs) -> ImageCaptionDataModule:
    options = dict(root=str(root), image_size=8, batch_size=2, val_fraction=0.0, scan_workers=1)
    return ImageCaptionDataModule(**{**options, **kwargs})


def _paths(dm) -> list[str]:
    return sorted(r.path for r in dm.train_dataset.records)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path PIL opens from now on."""
    seen: list[str] = []
    real_open = Image.open

    def recording_open(fp, *args, **kwargs):
        seen.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    return seen


@pytest.fixture
def outside(tmp_path):
    """A folder next to the dataset with a real, readable image and caption: only the link rule can stop them."""
    folder = tmp_path / "outside"
    _png(folder / "secret.png", colour=(1, 2, 3))
    (folder / "secret.txt").write_text("a secret caption", encoding="utf-8")
    return folder


# --- symbolic links --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_bad_file", ["skip", "error"])
def test_a_file_link_out_of_the_folder_is_refused_before_anything_is_opened(tmp_path, outside, opened, on_bad_file):
    root = tmp_path / "dataset"
    _png(root / "ok.png")
    (root / "evil.png").symlink_to(outside / "secret.png")
    _jsonl(root, [{"file_name": "ok.png", "text": "ok"}, {"file_name": "evil.png", "text": "evil"}])
    with pytest.raises(OutsideDatasetError) as info:
        _dm(root, on_bad_file=on_bad_file).setup("fit")
    message = str(info.value)
    assert "evil.png" in message and str(outside / "secret.png") in message and "follow_symlinks=True" in message
    assert not any("secret" in path for path in opened) and not any("ok.png" in path for path in opened)


def test_a_folder_link_out_of_the_folder_is_refused_in_every_layout(tmp_path, outside):
    root = tmp_path / "dataset"
    _png(root / "ok.png")
    (root / "ok.txt").write_text("ok", encoding="utf-8")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideDatasetError, match=r"linked -> .*outside.*follow_symlinks=True"):
        _dm(root).setup("fit")  # caption-file layout: found while walking the folder
    _jsonl(root, [{"file_name": "ok.png", "text": "ok"}, {"file_name": "linked/secret.png", "text": "x"}])
    with pytest.raises(OutsideDatasetError, match="linked"):
        _dm(root).setup("fit")  # metadata layout: found when the listed file is checked


def test_a_caption_file_link_out_of_the_folder_is_refused(tmp_path, outside):
    root = tmp_path / "dataset"
    _png(root / "ok.png")
    (root / "ok.txt").symlink_to(outside / "secret.txt")  # captions are trained on too
    with pytest.raises(OutsideDatasetError, match=r"ok\.txt -> .*secret\.txt"):
        _dm(root, on_bad_file="skip").setup("fit")
    followed = _dm(root, follow_symlinks=True)
    followed.setup("fit")
    assert followed.train_dataset.records[0].captions == ["a secret caption"]


def test_follow_symlinks_reads_linked_files_and_folders_and_links_inside_need_no_option(tmp_path, outside):
    root = tmp_path / "dataset"
    _png(root / "images" / "ok.png")
    (root / "images" / "ok.txt").write_text("ok", encoding="utf-8")
    (root / "alias.png").symlink_to(root / "images" / "ok.png")  # inside the folder: always fine
    (root / "alias.txt").write_text("alias", encoding="utf-8")
    plain = _dm(root)
    plain.setup("fit")
    assert _paths(plain) == ["alias.png", "images/ok.png"]
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a loop: walked once, so the walk ends
    (tmp_path / "one.png").symlink_to(outside / "secret.png")
    (root / "chain.png").symlink_to(tmp_path / "one.png")  # a chain of links, resolved to its end
    followed = _dm(root, follow_symlinks=True)
    followed.setup("fit")
    assert _paths(followed) == ["alias.png", "chain.png", "images/ok.png", "linked/secret.png"]
    by_path = {r.path: r.captions for r in followed.train_dataset.records}
    assert by_path["linked/secret.png"] == ["a secret caption"] and followed.skipped == []
    index = [r.path for r in followed.train_dataset.records].index("chain.png")
    assert followed.train_dataset[index]["image"].shape == (3, 8, 8)


def test_with_follow_symlinks_a_link_target_must_exist_and_be_an_image(tmp_path, outside, caplog):
    root = tmp_path / "dataset"
    _png(root / "ok.png")
    (outside / "notes.txt").write_text("not an image", encoding="utf-8")
    (root / "dangling.png").symlink_to(outside / "gone.png")
    (root / "text.png").symlink_to(outside / "notes.txt")
    (root / "folder.png").symlink_to(outside, target_is_directory=True)
    rows = [{"file_name": n, "text": n} for n in ("ok.png", "dangling.png", "text.png", "folder.png")]
    _jsonl(root, rows)
    with caplog.at_level(logging.WARNING, logger="ldm.data.scan"):
        dm = _dm(root, follow_symlinks=True)
        dm.setup("fit")
    assert _paths(dm) == ["ok.png"]
    reasons = {os.path.basename(p): r for p, r in dm.skipped}
    assert "does not exist" in reasons["dangling.png"] and str(outside / "gone.png") in reasons["dangling.png"]
    assert reasons["text.png"] == "not an image file PIL can identify"
    assert reasons["folder.png"] == "not a regular file"
    assert "skipped 3 of 4 images" in caplog.text and "dangling.png" in caplog.text
    with pytest.raises(BadImageError, match=r"dangling\.png.*does not exist"):
        _dm(root, follow_symlinks=True, on_bad_file="error").setup("fit")


# --- decompression bombs ---------------------------------------------------------------------------------------------

def _huge_png(path, side=10_000):
    """A ``side`` x ``side`` 1-bit PNG: about 12 KB on disk for 10,000 x 10,000 (~300 MB as RGB)."""
    Image.new("1", (side, side)).save(path)


def test_a_huge_png_is_skipped_from_its_header_without_decoding_and_without_pils_warning(tmp_path, monkeypatch, caplog):
    root = tmp_path / "dataset"
    _png(root / "ok.png")
    _huge_png(root / "bomb.png")
    assert (root / "bomb.png").stat().st_size < 50_000
    _jsonl(root, [{"file_name": "ok.png", "text": "ok"}, {"file_name": "bomb.png", "text": "bomb"}])
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL may not speak first
        with caplog.at_level(logging.WARNING, logger="ldm.data.scan"):
            dm = _dm(root)
            dm.setup("fit")
            assert _paths(dm) == ["ok.png"]
            (path, reason), = dm.skipped
            assert path == str(root / "bomb.png")
            assert "10000x10000" in reason and "100.0 megapixels" in reason and "max_image_pixels=67108864" in reason
            assert "skipped 1 of 2 images" in caplog.text and "bomb.png" in caplog.text
            again = _dm(root)  # the manifest knows the file: judged from its stored size, still not decoded
            again.setup("fit")
            assert again.skipped == dm.skipped
            with pytest.raises(BadImageError, match=r"bomb\.png.*max_image_pixels"):
                _dm(root, on_bad_file="error").setup("fit")
    assert (10_000, 10_000) not in decoded_sizes and (8, 8) in decoded_sizes


def test_the_pixel_limit_is_configurable_and_replaces_pils_own(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL would now refuse every 16x16 image (> 2 x 50 pixels)
    root = tmp_path / "dataset"
    _png(root / "big.png", size=(16, 16))
    _png(root / "small.png", size=(8, 8))
    _jsonl(root, [{"file_name": "big.png", "text": "big"}, {"file_name": "small.png", "text": "small"}])
    strict = _dm(root, max_image_pixels=100)
    strict.setup("fit")
    assert _paths(strict) == ["small.png"] and "16x16" in strict.skipped[0][1]
    relaxed = _dm(root, max_image_pixels=1000)  # same manifest, a higher limit: now accepted and loaded
    relaxed.setup("fit")
    assert _paths(relaxed) == ["big.png", "small.png"] and relaxed.skipped == []
    assert relaxed.train_dataset[0]["image"].shape == (3, 8, 8)
    assert Image.MAX_IMAGE_PIXELS == 50  # PIL's setting is restored
    with pytest.raises(ImageTooLargeError, match="16x16") as info:
        load_rgb(root / "big.png", max_pixels=255)
    again = pickle.loads(pickle.dumps(info.value))  # as it crosses from a DataLoader worker
    assert (again.path, again.width, again.height, again.reason) == (info.value.path, 16, 16, info.value.reason)
    with pytest.raises(ValueError, match="max_image_pixels"):
        _dm(root, max_image_pixels=0)


# --- NUL bytes and invalid UTF-8 -------------------------------------------------------------------------------------

def test_a_nul_byte_in_file_name_is_skipped_and_counted_or_refused_naming_the_line(tmp_path, caplog):
    root = tmp_path / "dataset"
    _png(root / "ok.png")
    _jsonl(root, [{"file_name": "ok.png", "text": "ok"}, {"file_name": "bad\u0000.png", "text": "nul"}])
    with caplog.at_level(logging.WARNING, logger="ldm.data.sources"):
        dm = _dm(root)
        dm.setup("fit")
    assert _paths(dm) == ["ok.png"]
    (where, reason), = dm.skipped
    assert where == f"{root / 'metadata.jsonl'}, line 2" and "NUL byte" in reason
    assert "skipped 1 bad metadata line" in caplog.text and "line 2" in caplog.text
    with pytest.raises(BadMetadataError, match=r"metadata\.jsonl, line 2: .*NUL byte.*on_bad_file='skip'"):
        _dm(root, on_bad_file="error").setup("fit")
    (root / "metadata.jsonl").unlink()  # the same in a CSV, with the raw byte
    (root / "metadata.csv").write_bytes(b"file_name,text\nok.png,ok\nbad\x00.png,nul\n")
    with pytest.raises(BadMetadataError, match=r"metadata\.csv, line 3: .*NUL byte"):
        discover_records(root)


def test_invalid_utf8_in_a_metadata_line_is_skipped_and_counted_or_refused_naming_the_line(tmp_path, caplog):
    root = tmp_path / "dataset"
    for name in ("a.png", "b.png", "c.png"):
        _png(root / name)
    lines = [b'{"file_name": "a.png", "text": "fine"}', b'{"file_name": "b.png", "text": "caf\xe9 latin-1"}',
             b'{"file_name": "c.png", "text": "fine too"}']
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="ldm.data.sources"):
        dm = _dm(root)
        dm.setup("fit")
    assert _paths(dm) == ["a.png", "c.png"]  # the lines after the bad one are read
    (where, reason), = dm.skipped
    assert where == f"{root / 'metadata.jsonl'}, line 2" and "not valid UTF-8 (byte 0xe9" in reason
    assert "metadata.jsonl, line 2" in caplog.text
    with pytest.raises(BadMetadataError, match=r"metadata\.jsonl, line 2: not valid UTF-8.*on_bad_file='skip'"):
        _dm(root, on_bad_file="error").setup("fit")


def test_invalid_utf8_in_a_caption_file_skips_its_image_or_is_refused_naming_the_line(tmp_path, caplog):
    root = tmp_path / "dataset"
    _png(root / "a.png")
    (root / "a.txt").write_text("a fine caption\n", encoding="utf-8")
    _png(root / "b.png")
    (root / "b.txt").write_bytes(b"first caption\nsecond \xff caption\n")
    with caplog.at_level(logging.WARNING, logger="ldm.data.sources"):
        dm = _dm(root)
        dm.setup("fit")
    assert _paths(dm) == ["a.png"]
    (where, reason), = dm.skipped
    assert where == f"caption file {root / 'b.txt'}, line 2" and "byte 0xff" in reason and "b.png left out" in reason
    assert "b.txt, line 2" in caplog.text
    with pytest.raises(BadMetadataError, match=r"b\.txt, line 2: not valid UTF-8"):
        _dm(root, on_bad_file="error").setup("fit")


# --- damaged caches --------------------------------------------------------------------------------------------------

def _pool_encoder(images: torch.Tensor) -> torch.Tensor:
    """Stands in for a VAE encoder: 4x average pooling as the mean, a constant log-variance."""
    mean = F.avg_pool2d(images, 4)
    return torch.cat([mean, torch.full_like(mean, -2.0)], dim=1)


@pytest.mark.parametrize("with_record", [True, False], ids=["recorded", "written-before-records"])
def test_a_truncated_latent_cache_shard_is_detected_rebuilt_and_logged(tmp_path, caplog, with_record):
    root = tmp_path / "dataset"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    _jsonl(root, [{"file_name": f"{i}.png", "text": f"image {i}"} for i in range(6)])
    first = _dm(root, image_size=16)
    first.setup("fit")
    assert first.enable_latent_cache(tmp_path / "cache", _pool_encoder, "pool-v1")
    expected = [first.cached_train_dataset.moments(i).clone() for i in range(6)]
    shard, = (tmp_path / "cache").glob("latents-*/shard-*.safetensors")
    sums = shard.with_name(shard.name.replace("shard-", "sums-").replace(".safetensors", ".json"))
    assert json.loads(sums.read_text())["bytes"] == shard.stat().st_size
    if not with_record:
        sums.unlink()
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # "SafetensorError: incomplete metadata"
    calls = []

    def counting_encoder(images):
        calls.append(images.shape[0])
        return _pool_encoder(images)

    again = _dm(root, image_size=16)
    with caplog.at_level(logging.WARNING, logger="ldm.data.cache_shards"):
        assert again.enable_latent_cache(tmp_path / "cache", counting_encoder, "pool-v1")
    assert f"latent cache shard {shard} is damaged" in caplog.text and "rebuilt 1 damaged shard" in caplog.text
    assert sum(calls) == 6
    for i in range(6):
        assert torch.equal(again.cached_train_dataset.moments(i), expected[i])
    batch = next(iter(again.train_dataloader()))
    assert batch["moments"].shape == (2, 6, 4, 4)
    assert json.loads(sums.read_text())["bytes"] == shard.stat().st_size  # recorded anew
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ldm.data.cache_shards"):  # intact now: reused, nothing encoded
        _dm(root, image_size=16).enable_latent_cache(tmp_path / "cache", counting_encoder, "pool-v1")
    assert "reusing the cache" in caplog.text and sum(calls) == 6


def test_a_shard_whose_bytes_changed_is_rebuilt_by_the_rank_that_owns_it(tmp_path, caplog):
    folder = tmp_path / "set"

    def compute(indices):
        return {"x": torch.tensor(indices, dtype=torch.float32)[:, None] * 2}

    barrier = threading.Barrier(2, timeout=60)
    ranks = [threading.Thread(target=build_or_load_shards, args=(folder, 5, compute, r, 2, barrier.wait)) for r in (0, 1)]
    for thread in ranks:  # a set written by two ranks
        thread.start()
    for thread in ranks:
        thread.join()
    one = folder / "shard-00001-of-00002.safetensors"
    data = bytearray(one.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit of the last value flipped
    one.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ldm.data.cache_shards"):
        merged = build_or_load_shards(folder, 5, compute, 0, 1, barrier=lambda: None)  # now a single process
    assert "SHA-256 differs" in caplog.text and "shard-00001-of-00002" in caplog.text
    assert torch.equal(merged["x"][:, 0], torch.arange(5, dtype=torch.float32) * 2)


def test_a_truncated_precomputed_chunk_is_named_with_the_fix(tmp_path):
    from litdata.streaming.writer import BinaryWriter

    folder = tmp_path / "train"
    writer = BinaryWriter(str(folder), chunk_bytes="2kb")
    for i in range(40):
        writer.add_item(i, {"index": i, "moments": torch.full((4, 4), float(i))})
    writer.done()
    writer.merge()
    check_local_chunks(folder)  # intact: nothing to say
    chunk = sorted(folder.glob("chunk-*.bin"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{chunk.name} is 100 bytes, \d+ when written.*ldm data encode"):
        check_local_chunks(folder)
    chunk.unlink()
    with pytest.raises(ValueError, match=rf"{chunk.name} is missing"):
        check_local_chunks(folder)
