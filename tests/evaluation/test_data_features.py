"""The feature network trained on the dataset itself: vocabulary, training, the self-supervised fallback, the cache."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.builtin import prepare_builtin
from ldm.evaluation.data_features import DataFeatureSettings, caption_vocabulary, caption_words, train_data_feature_net
from ldm.evaluation.eval_data import evaluation_dataset
from ldm.evaluation.feature_networks import DataFeatureNetwork
from ldm.evaluation.statistics import frechet_distance


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """120 built-in shape images (captions such as 'a small red circle left of a blue square'), 32 px."""
    root = prepare_builtin("shapes", tmp_path_factory.mktemp("data") / "shapes", num_images=120)
    return evaluation_dataset(str(root), image_size=32)


def test_vocabulary_drops_words_in_almost_every_image_and_rare_ones():
    assert caption_words("A hand-drawn 7, twice!") == ["a", "hand", "drawn", "7", "twice"]
    captions = [[f"a photo of a {'red' if i % 2 else 'blue'} cat"] + ([f"seen once {i}"] if i < 3 else []) for i in range(20)]
    captions[0].append("a rare zebra")
    # "a", "photo", "of", "cat": in every image; "seen"/"once": 3 images; digits and "zebra": 1.
    assert caption_vocabulary(captions, max_share=0.9, min_images=4) == ["blue", "red"]
    assert caption_vocabulary(captions, max_share=0.9, min_images=3) == ["blue", "once", "red", "seen"]
    assert caption_vocabulary(captions, min_images=3, max_words=2) == ["blue", "red"]


def test_trained_on_captions_its_features_separate_real_images_from_noise(shapes):
    network = DataFeatureNetwork.for_dataset(shapes, DataFeatureSettings(steps=200, batch_size=32))
    summary = network.summary
    assert summary["objective"] == "words" and {"red", "circle", "square", "left"} <= set(summary["vocabulary"])
    assert "a" not in summary["vocabulary"]  # in every caption
    assert summary["loss_last"] < 0.6 * summary["loss_first"]
    real = torch.stack([shapes.image(i) for i in range(len(shapes))])
    features = network.features(real)
    assert features.shape == (120, 64) and np.isfinite(features).all()
    noise = network.features(torch.rand(60, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    real_vs_real = frechet_distance(features[:60], features[60:])
    assert frechet_distance(features[:60], noise) > 5 * real_vs_real
    # It predicts the words: a red shape's "red" logit beats that of images without red.
    with torch.no_grad():
        logits = network.net(real)
    red = summary["vocabulary"].index("red")
    has_red = torch.tensor(["red" in caption_words(" ".join(r.captions)) for r in shapes.records])
    assert logits[has_red, red].mean() > logits[~has_red, red].mean() + 1.0


def test_training_is_deterministic_for_a_seed(shapes):
    images = torch.stack([shapes.image(i) for i in range(40)])
    captions = [r.captions for r in shapes.records[:40]]
    settings = DataFeatureSettings(steps=8, min_images=2)
    a, _ = train_data_feature_net(images, captions, settings)
    b, _ = train_data_feature_net(images, captions, settings)
    c, _ = train_data_feature_net(images, captions, DataFeatureSettings(steps=8, min_images=2, seed=1))
    with torch.no_grad():
        assert torch.equal(a.features(images), b.features(images))
        assert not torch.allclose(a.features(images), c.features(images))


def test_without_captions_it_learns_rotations_and_mirrorings(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(24):  # asymmetric blobs: a bright corner, so orientation is visible
        pixels = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
        pixels[2:12, 2:20] = 255
        Image.fromarray(pixels).save(tmp_path / f"{i:02d}.png")
    dataset = evaluation_dataset(str(tmp_path), image_size=32)
    assert all(not r.captions for r in dataset.records)
    network = DataFeatureNetwork.for_dataset(dataset, DataFeatureSettings(steps=120))
    assert network.info["objective"] == "transforms" and network.info["vocabulary"] == []
    assert network.summary["loss_last"] < 0.5 * network.summary["loss_first"]


def test_cached_network_is_reused_and_retrained_when_the_data_or_file_changes(shapes, tmp_path, caplog):
    settings = DataFeatureSettings(steps=5)
    first = DataFeatureNetwork.for_dataset(shapes, settings, tmp_path / "cache")
    cache_file = first.info["cache_file"]
    assert first.info["trained_now"] and cache_file.endswith(".safetensors")
    again = DataFeatureNetwork.for_dataset(shapes, settings, tmp_path / "cache")
    assert not again.info["trained_now"] and again.info["cache_file"] == cache_file
    images = torch.stack([shapes.image(i) for i in range(8)])
    assert np.array_equal(first.features(images), again.features(images))
    assert again.summary == first.summary
    # Other settings: another network, another file.
    other = DataFeatureNetwork.for_dataset(shapes, DataFeatureSettings(steps=6), tmp_path / "cache")
    assert other.info["trained_now"] and other.info["cache_file"] != cache_file
    # A damaged cache file is not trusted: retrained (and logged), then rewritten.
    with open(cache_file, "r+b") as f:
        f.write(b"\xff" * 16)
    with caplog.at_level(logging.WARNING):
        repaired = DataFeatureNetwork.for_dataset(shapes, settings, tmp_path / "cache")
    assert repaired.info["trained_now"] and "ignoring the cached feature network" in caplog.text
    assert np.array_equal(repaired.features(images), first.features(images))  # same seed, same network
    assert not DataFeatureNetwork.for_dataset(shapes, settings, tmp_path / "cache").info["trained_now"]


def test_too_few_images_are_refused(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "only.png")
    (tmp_path / "only.txt").write_text("a lonely picture")
    dataset = evaluation_dataset(str(tmp_path), image_size=32)
    with pytest.raises(ValueError, match="has 1 image"):
        DataFeatureNetwork.for_dataset(dataset)
