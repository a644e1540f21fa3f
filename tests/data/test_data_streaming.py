"""litdata shards: ``ldm data optimize`` -> ``StreamingImageCaptionDataModule`` gives the folder's samples, with
unreadable files counted, and each of 2 ranks x 2 workers reads a disjoint share."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_tiny_dataset

from ldm.cli import main
from ldm.data import ImageCaptionDataModule
from ldm.data.shards import optimize_dataset
from ldm.data.streaming import StreamingImageCaptionDataModule


@pytest.fixture
def folder(tmp_path):
    root = write_tiny_dataset(tmp_path / "images", n=30, size=12)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "a broken file"}) + "\n")
    return root


def test_optimize_then_stream_gives_the_folder_samples(folder, tmp_path):
    summary = optimize_dataset(str(folder), tmp_path / "shards", chunk_bytes="2KB", val_fraction=0.2)
    reference = ImageCaptionDataModule(root=str(folder), image_size=8, val_fraction=0.2)
    reference.setup("fit")
    assert summary["splits"] == {"train": len(reference.train_dataset), "val": len(reference.val_dataset)}
    assert [p for p, _ in summary["skipped"]] == [str(folder / "broken.png")]  # counted, as the folder path does

    streamed = StreamingImageCaptionDataModule(root=str(tmp_path / "shards"), image_size=8)
    streamed.setup("fit")
    assert len(streamed.train_dataset.chunk_sizes) > 1  # several chunks: the chunk-local shuffle has work to do
    for ours, theirs in ((streamed.train_dataset, reference.train_dataset), (streamed.val_dataset, reference.val_dataset)):
        by_path = {r.path: i for i, r in enumerate(theirs.records)}
        assert len(ours) == len(theirs)
        theirs.train = False
        for i in range(len(ours)):
            j = by_path[ours.shards[i]["path"]]
            ours.train = False
            a, b = ours[i], theirs[j]
            assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"]
            assert json.loads(ours.shards[i]["captions"]) == theirs.records[j].captions


def test_ranks_and_workers_read_disjoint_shares(folder, tmp_path, monkeypatch):
    optimize_dataset(str(folder), tmp_path / "shards", chunk_bytes="2KB", val_fraction=0.0)
    seen = []
    for rank in range(2):
        monkeypatch.setattr("ldm.data.resumable.world", lambda rank=rank: (rank, 2))
        dm = StreamingImageCaptionDataModule(root=str(tmp_path / "shards"), image_size=8, batch_size=3, num_workers=2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches = [b["index"].tolist() for b in loader]
        assert len(batches) == len(loader) == 30 // 3 // 2
        seen.append({i for b in batches for i in b})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 30


def test_cli_optimize_and_missing_shards(folder, tmp_path, capsys):
    main(["data", "optimize", str(folder), "--out", str(tmp_path / "out"), "--chunk-bytes", "4KB"])
    assert "1 unreadable skipped" in capsys.readouterr().out
    assert (tmp_path / "out" / "train" / "index.json").is_file()
    with pytest.raises(FileNotFoundError, match="ldm data optimize"):
        StreamingImageCaptionDataModule(root=str(tmp_path / "nothing")).setup("fit")


def test_ldm_fit_trains_from_shards(tmp_path, monkeypatch):
    import yaml
    from conftest import make_ldm_assets, tiny_ldm_kwargs

    assets = make_ldm_assets(tmp_path / "assets")
    main(["data", "optimize", str(assets["data"]), "--out", str(tmp_path / "shards"), "--chunk-bytes", "16KB"])
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "limit_val_batches": 1, "logger": False,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
                                  {"class_path": "ldm.models.SavePretrained", "init_args": {"dirpath": str(tmp_path / "export")}}]},
        "model": {"class_path": "ldm.models.LatentDiffusion", "init_args": tiny_ldm_kwargs(assets, validation={"steps": 2})},
        "data": {"class_path": "ldm.data.StreamingImageCaptionDataModule",
                 "init_args": {"root": str(tmp_path / "shards"), "batch_size": 4}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str))))
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    assert (tmp_path / "export" / "model_index.json").is_file()
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and state["StreamingImageCaptionDataModule"]["consumed_batches"] == 3
    # and it resumes from there
    main(["fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.max_steps", "5", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
