"""ImageCaptionDataset and its transform: tensors in [-1, 1], crops, flips, caption sampling."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ldm.data.dataset import ImageCaptionDataset, build_transform
from ldm.data.records import ImageRecord

RED = torch.tensor([1.0, -1.0, -1.0])
BLUE = torch.tensor([-1.0, -1.0, 1.0])


def _half_red_half_blue(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 0, 0))
    img.paste((0, 0, 255), (width // 2, 0, width, height))
    return img


@pytest.fixture
def dataset_root(tmp_path):
    _half_red_half_blue(64, 32).save(tmp_path / "wide.png")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(tmp_path / "green.png")
    return tmp_path


def test_item_layout_and_value_range(dataset_root):
    records = [ImageRecord("wide.png", ["a", "b", "c"]), ImageRecord("green.png", [])]
    ds = ImageCaptionDataset(dataset_root, records, image_size=16)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"image", "text", "index", "size_conditioning"}
    assert item["size_conditioning"].tolist() == [32, 64, 0, 8]  # wide.png 64x32 -> 32x16, centre cut 8 from the left
    assert type(item["image"]) is torch.Tensor  # a plain tensor, not a tv_tensors subclass
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["index"] == 0
    green = ds[1]
    assert green["text"] == ""  # uncaptioned images train unconditionally
    assert torch.allclose(green["image"][:, 8, 8], torch.tensor([-1.0, 1.0, -1.0]))


def test_resize_shorter_side_then_center_crop(dataset_root):
    # 64x32 -> 32x16 -> centre 16x16 crop keeps columns 8..23: left half red, right half blue
    image = build_transform(16, "center")(Image.open(dataset_root / "wide.png").convert("RGB"))
    assert torch.allclose(image[:, 8, 1], RED, atol=1e-6)
    assert torch.allclose(image[:, 8, 14], BLUE, atol=1e-6)


def test_random_crop_varies_and_center_crop_does_not(dataset_root):
    wide = Image.open(dataset_root / "wide.png").convert("RGB")
    torch.manual_seed(0)
    random_crops = {tuple(build_transform(16, "random")(wide)[0, 8].tolist()) for _ in range(30)}
    assert len(random_crops) > 1
    center = build_transform(16, "center")
    assert all(torch.equal(center(wide), center(wide)) for _ in range(5))


def test_flip_is_off_by_default_and_works_when_on(dataset_root):
    square = _half_red_half_blue(16, 16)
    default = build_transform(16)
    assert all(torch.allclose(default(square)[:, 0, 0], RED) for _ in range(20))
    torch.manual_seed(0)
    flipping = build_transform(16, random_flip=True)
    left_colours = {tuple(flipping(square)[:, 0, 0].tolist()) for _ in range(20)}
    assert left_colours == {tuple(RED.tolist()), tuple(BLUE.tolist())}


def test_unknown_crop_is_refused():
    with pytest.raises(ValueError, match="crop"):
        build_transform(32, "middle")


def test_train_mode_samples_captions_eval_mode_uses_the_first(dataset_root):
    records = [ImageRecord("green.png", ["first", "second", "third"])]
    train = ImageCaptionDataset(dataset_root, records, image_size=8, train=True)
    torch.manual_seed(0)
    drawn = [train.caption(0) for _ in range(60)]
    assert set(drawn) == {"first", "second", "third"}
    assert train[0]["text"] in {"first", "second", "third"}
    evaluation = ImageCaptionDataset(dataset_root, records, image_size=8, train=False)
    assert {evaluation[0]["text"] for _ in range(10)} == {"first"}


def test_caption_sampling_follows_the_torch_seed(dataset_root):
    records = [ImageRecord("green.png", [str(i) for i in range(10)])]
    ds = ImageCaptionDataset(dataset_root, records, image_size=8)
    torch.manual_seed(123)
    first = [ds.caption(0) for _ in range(20)]
    torch.manual_seed(123)
    assert [ds.caption(0) for _ in range(20)] == first
