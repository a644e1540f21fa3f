"""ImageCaptionDataModule: built-ins, user folders, batches, splits, loaders and validation."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from PIL import Image

from ldm.data import BadImageError, ImageCaptionDataModule


def _shapes_module(tmp_path, **kwargs):
    options = {"num_images": 40}
    return ImageCaptionDataModule(
        root="shapes", data_dir=str(tmp_path / "data"), builtin_options=options, **kwargs
    )


def _setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_builtin_digits_are_prepared_into_data_dir_and_batched(tmp_path):
    dm = ImageCaptionDataModule(root="digits", data_dir=str(tmp_path / "data"), batch_size=16)
    assert not (tmp_path / "data" / "digits").exists()
    _setup(dm)
    assert (tmp_path / "data" / "digits" / "metadata.jsonl").is_file()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert len(dm.val_dataset) > 0 and dm.skipped == []
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"].min() < -0.9 and batch["image"].max() > 0.9  # really uses the range
    assert isinstance(batch["text"], list) and len(batch["text"]) == 16
    assert all(isinstance(t, str) and t for t in batch["text"])
    val_batch = next(iter(dm.val_dataloader()))
    labels = [int(t.rsplit(" ", 1)[1]) for t in val_batch["text"]]  # eval: first caption
    assert all(t == f"a handwritten digit {d}" for t, d in zip(val_batch["text"], labels))


def paths(dataset):
    return [r.path for r in dataset.records]


def test_split_is_deterministic_across_instances(tmp_path):
    first = _setup(_shapes_module(tmp_path))
    second = _setup(_shapes_module(tmp_path))
    assert paths(first.train_dataset) == paths(second.train_dataset)
    assert paths(first.val_dataset) == paths(second.val_dataset)
    assert len(first.val_dataset) > 0
    assert set(paths(first.train_dataset)).isdisjoint(paths(first.val_dataset))


def test_hash_split_of_a_user_folder(tmp_path):
    for i in range(30):
        Image.new("RGB", (12, 12), (i * 8, 0, 0)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"image {i}")
    dm = _setup(ImageCaptionDataModule(root=str(tmp_path), image_size=8, val_fraction=0.2))
    assert 0 < len(dm.val_dataset) < 30
    assert len(dm.train_dataset) + len(dm.val_dataset) == 30
    again = _setup(ImageCaptionDataModule(root=str(tmp_path), image_size=8, val_fraction=0.2))
    assert [r.path for r in again.val_dataset.records] == [r.path for r in dm.val_dataset.records]


def _first_left_shape(dataset):
    """Index of an image with a shape on the left only, so a flip changes it."""
    for i, record in enumerate(dataset.records):
        shapes = record.metadata["attributes"]["shapes"]
        if [s["position"] for s in shapes] == ["left"]:
            return i
    raise AssertionError("no image with a single shape on the left")


def test_random_flip_is_off_by_default(tmp_path):
    dm = _setup(_shapes_module(tmp_path))
    i = _first_left_shape(dm.train_dataset)
    torch.manual_seed(0)
    views = [dm.train_dataset[i]["image"] for _ in range(10)]
    assert all(torch.equal(views[0], v) for v in views)
    flipping = _setup(_shapes_module(tmp_path, random_flip=True))
    torch.manual_seed(0)
    views = [flipping.train_dataset[i]["image"] for _ in range(10)]
    assert any(not torch.equal(views[0], v) for v in views)


def test_drop_last_and_batch_sizes(tmp_path):
    dm = _setup(_shapes_module(tmp_path, batch_size=8, val_batch_size=3))
    n_train = len(dm.train_dataset)
    assert len(dm.train_dataloader()) == n_train // 8
    assert all(len(b["text"]) == 8 for b in dm.train_dataloader())
    assert len(next(iter(dm.val_dataloader()))["text"]) == 3
    big = _setup(_shapes_module(tmp_path, batch_size=500))
    assert [len(b["text"]) for b in big.train_dataloader()] == [n_train]


def test_max_train_samples_and_workers(tmp_path):
    dm = _setup(_shapes_module(tmp_path, max_train_samples=5, batch_size=2, num_workers=1,
                               persistent_workers=True))
    assert len(dm.train_dataset) == 5
    loader = dm.train_dataloader()
    # training workers restart each epoch (they learn its order when they start); validation workers persist
    assert loader.num_workers == 1 and not loader.persistent_workers and dm.val_dataloader().persistent_workers
    assert sum(len(b["text"]) for b in loader) == 4
    no_workers = _setup(_shapes_module(tmp_path, persistent_workers=True))
    assert no_workers.train_dataloader().persistent_workers is False


def test_existing_folder_wins_over_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "shapes" / "mine.png")
    (tmp_path / "shapes" / "mine.txt").write_text("my own shapes folder")
    dm = _setup(ImageCaptionDataModule(root="shapes", data_dir="data", image_size=8))
    assert not (tmp_path / "data").exists()
    assert [r.path for r in dm.train_dataset.records + dm.val_dataset.records] == ["mine.png"]


def test_csv_file_and_bad_files_through_the_module(tmp_path, caplog):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"")
    (tmp_path / "list.csv").write_text("image,caption\na.png,x\nb.png,y\nc.png,z\nd.png,w\n")
    dm = _setup(ImageCaptionDataModule(root=str(tmp_path), csv_file="list.csv", image_size=8,
                                       val_fraction=0.0))
    assert sorted(r.path for r in dm.train_dataset.records) == ["a.png", "b.png"]
    assert sorted(p for p, _ in dm.skipped) == [str(tmp_path / "c.png"), str(tmp_path / "d.png")]
    assert len(dm.val_dataset) == 0 and dm.val_dataloader() == []
    strict = ImageCaptionDataModule(root=str(tmp_path), csv_file="list.csv", on_bad_file="error")
    with pytest.raises(BadImageError, match="c.png"):
        strict.setup("fit")


def test_path_traversal_is_refused_without_opening_the_target(tmp_path, monkeypatch):
    root = tmp_path / "dataset"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    rows = [{"file_name": "ok.png", "text": "ok"}, {"file_name": "../secret.png", "text": "x"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opened = []
    real_open = Image.open

    def recording_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    dm = ImageCaptionDataModule(root=str(root), on_bad_file="skip")
    with pytest.raises(ValueError, match=r"metadata\.jsonl.*\.\./secret\.png"):
        dm.setup("fit")
    assert not any("secret" in path for path in opened)
    # control: the recording hook does see files that are opened
    (root / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n")
    _setup(ImageCaptionDataModule(root=str(root), val_fraction=0.0))
    assert str(root / "ok.png") in opened

@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"crop": "middle"}, ["crop", "'center'", "'random'"]),
        ({"on_bad_file": "ignore"}, ["on_bad_file", "'skip'", "'error'"]),
        ({"val_fraction": 1.0}, ["val_fraction", "[0, 1)"]),
        ({"val_fraction": -0.1}, ["val_fraction"]),
        ({"batch_size": 0}, ["batch_size"]),
        ({"max_train_samples": 0}, ["max_train_samples"]),
    ],
)
def test_arguments_are_validated_early(kwargs, words):
    with pytest.raises(ValueError) as info:
        ImageCaptionDataModule(**kwargs)
    assert all(word in str(info.value) for word in words)


def test_unknown_root_names_path_and_builtins(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ImageCaptionDataModule(root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "nowhere" in message and "digits" in message and "shapes" in message


def test_trains_with_a_lightning_trainer(tmp_path):
    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Conv2d(3, 1, 1)
            self.seen_val = 0

        def training_step(self, batch, batch_idx):
            return self.layer(batch["image"]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.seen_val += len(batch["text"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = _shapes_module(tmp_path, batch_size=4)
    model = Tiny()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert model.seen_val == min(4, len(dm.val_dataset)) > 0
    assert dm.hparams["root"] == "shapes"
