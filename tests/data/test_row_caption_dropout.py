"""A data row's own caption-dropout rate (metadata ``caption_dropout``, kohya's per-subset ``caption_dropout_rate``):
carried by dataset and latent-cache items, used by the training step instead of ``objective.cond_dropout``, refused when
it is not a rate, and left out of validation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_ldm_kwargs, write_tiny_dataset
from ldm.data import ImageCaptionDataset, discover_records
from ldm.data.latent_cache import CachedLatentDataset
from ldm.diffusion import caption_drop_mask, drop_captions
from ldm.models import LatentDiffusion


def _with_rates(root, rates: dict[int, object]):
    """Add ``caption_dropout`` to rows of a tiny dataset's metadata.jsonl."""
    path = root / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, rate in rates.items():
        rows[i]["caption_dropout"] = rate
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_row_rates_override_the_global_rate_with_the_same_draw():
    n = 4000
    rates = torch.tensor([0.0, 1.0, -1.0, 0.5] * (n // 4))
    mask = caption_drop_mask(n, 0.1, torch.Generator().manual_seed(0), rates)
    assert not mask[0::4].any() and mask[1::4].all()
    assert 0.07 < mask[2::4].float().mean() < 0.13 and 0.45 < mask[3::4].float().mean() < 0.55
    # Rows without a rate of their own draw exactly what they drew before rates existed.
    plain = caption_drop_mask(n, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(caption_drop_mask(n, 0.1, torch.Generator().manual_seed(0), torch.full((n,), -1.0)), plain)
    assert torch.equal(mask[2::4], plain[2::4])
    # A global rate of 0 with a row rate still drops that row; nothing to drop draws nothing.
    g = torch.Generator().manual_seed(0)
    assert drop_captions(["a", "b"], 0.0, g, torch.tensor([1.0, -1.0])) == ["", "b"]
    state = g.get_state()
    assert drop_captions(["a", "b"], 0.0, g, torch.tensor([0.0, -1.0])) == ["a", "b"]
    assert torch.equal(g.get_state(), state)


def test_dataset_and_latent_cache_items_carry_the_row_rate(tmp_path):
    plain = write_tiny_dataset(tmp_path / "plain", n=4)
    assert "caption_dropout" not in ImageCaptionDataset(plain, discover_records(plain))[0]
    root = _with_rates(write_tiny_dataset(tmp_path / "rates", n=4), {0: 0, 2: 0.25})
    ds = ImageCaptionDataset(root, discover_records(root))
    by_path = {r.path: i for i, r in enumerate(ds.records)}
    expected = {"images/000.png": 0.0, "images/001.png": -1.0, "images/002.png": 0.25, "images/003.png": -1.0}
    assert {p: ds[i]["caption_dropout"] for p, i in by_path.items()} == expected
    cached = CachedLatentDataset(ds, [torch.zeros(4, 8, 2, 2)], [range(4)])
    assert [cached[i]["caption_dropout"] for i in range(4)] == [ds[i]["caption_dropout"] for i in range(4)]
    batch = torch.utils.data.default_collate([cached[i] for i in range(4)])
    assert batch["caption_dropout"].shape == (4,)


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.1", True, None])
def test_a_rate_that_is_not_a_rate_is_refused_naming_the_image(tmp_path, bad):
    root = _with_rates(write_tiny_dataset(tmp_path / "bad", n=3), {1: bad})
    with pytest.raises(ValueError, match=r"images/001\.png: caption_dropout=.* must be a number from 0 to 1"):
        ImageCaptionDataset(root, discover_records(root))


def test_the_training_step_uses_row_rates_and_validation_drops_nothing(ldm_assets, monkeypatch):
    torch.manual_seed(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, objective={"cond_dropout": 0.5}))
    seen = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda prompts: seen.append(list(prompts)) or encode(prompts))
    texts = [f"image {i}" for i in range(8)]
    batch = {"image": torch.zeros(8, 3, 32, 32), "text": texts,
             "caption_dropout": torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)}
    model.diffusion_loss(batch, torch.Generator().manual_seed(0), 0.5)
    assert seen[-1] == ["image 0", "", "image 2", "", "image 4", "", "image 6", ""]
    model.validation_step(batch, 0)
    assert seen[-1] == texts


def test_streamed_items_carry_the_row_rate(tmp_path):
    from ldm.data.shards import optimize_dataset
    from ldm.data.streaming import StreamingImageCaptionDataModule

    root = _with_rates(write_tiny_dataset(tmp_path / "rates", n=6, size=12), {0: 0.0, 3: 0.5})
    optimize_dataset(str(root), tmp_path / "shards", val_fraction=0.0)
    streamed = StreamingImageCaptionDataModule(root=str(tmp_path / "shards"), image_size=8)
    streamed.setup("fit")
    ds = streamed.train_dataset
    rates = {ds.shards[i]["path"]: ds[i]["caption_dropout"] for i in range(len(ds))}
    assert rates == {f"images/{i:03d}.png": {0: 0.0, 3: 0.5}.get(i, -1.0) for i in range(6)}
