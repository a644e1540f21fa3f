"""CLIP score on a tiny random CLIPModel saved locally (transformers v5; any folder name)."""

import json

import pytest
import torch
from evaluation_helpers import save_tiny_clip

from ldm.evaluation.clip_score import CLIP_MEAN, CLIP_STD, ClipScorer, _embedding


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")  # no "openai" in the name


def test_score_is_100_times_the_clipped_cosine_of_clip_embeddings(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red circle", "a blue square", "a green circle number 3", "a red square"]
    scores = scorer.per_image(images, prompts, batch_size=3)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 100)).all()

    # Reference: the model's own forward pass, whose logits are logit_scale * cosine of the normalised embeddings.
    pixels = ((images + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(scorer._pixels(images), pixels, atol=1e-5)  # 32-px model, 32-px images: no resize
    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    cosine = out.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    assert torch.allclose(torch.from_numpy(scores).float(), 100 * cosine.clamp(min=0), atol=1e-3)
    assert scorer.score(images, prompts) == pytest.approx(float(scores.mean()), abs=1e-4)  # batches of 3 vs 64

    # Other sizes are resized and centre-cropped to the model's; the same seed gives the same scores.
    wide = torch.rand(2, 3, 40, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert scorer._pixels(wide).shape == (2, 3, 32, 32)
    assert (scorer.per_image(wide, prompts[:2]) == scorer.per_image(wide, prompts[:2])).all()


def test_embeddings_from_transformers_v4_tensors_and_v5_output_objects():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.randn(2, 8)
    assert _embedding(t) is t
    assert _embedding(BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 8), pooler_output=t)) is t


def test_bad_clip_models_are_named(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ClipScorer(tmp_path / "not-here")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ClipScorer("./models/clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScorer(tmp_path / "empty")
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    config = json.loads((tiny_clip / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps({**config["text_config"], "model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match="'clip_text_model' model, not a CLIPModel.*image tower"):
        ClipScorer(text_only)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_clip / "config.json").read_text())
    with pytest.raises(ValueError, match="could not be loaded from the folder"):
        ClipScorer(no_weights)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ClipScorer(tiny_clip).per_image(torch.zeros(2, 3, 32, 32), ["one"])
