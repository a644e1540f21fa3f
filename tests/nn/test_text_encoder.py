"""TextEncoder: a tiny CLIPTextModel on a caption-trained tokenizer; all offline."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.data.tokenizer import train_clip_tokenizer
from ldm.formats.text_encoder_files import load_text_encoder, new_text_encoder
from ldm.nn.configs import TextEncoderConfig
from ldm.nn.text_encoder import TextEncoder

CAPTIONS = [f"a handwritten digit {d}" for d in range(10)] + [
    f"a small {c} {s} on the {p}"
    for c in ("red", "blue", "green")
    for s in ("circle", "square")
    for p in ("left", "right")
]
HIDDEN = 32


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_clip_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok"), vocab_size=600)


@pytest.fixture
def encoder(tokenizer_dir: Path) -> TextEncoder:
    torch.manual_seed(0)
    return new_text_encoder(tokenizer_dir, TextEncoderConfig(hidden_size=HIDDEN, num_layers=2, num_heads=2)).eval()


def test_from_config_sizes_the_model_to_the_tokenizer(encoder: TextEncoder):
    config = encoder.model.config
    tokenizer = encoder.tokenizer
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.max_position_embeddings == 77 and config.intermediate_size == 4 * HIDDEN
    assert encoder.hidden_size == HIDDEN


def test_encode_shapes_and_prompts_differ(encoder: TextEncoder):
    with torch.no_grad():
        context = encoder.encode(["a handwritten digit 7", "a small red circle on the left", ""])
        single = encoder.encode("a handwritten digit 7")
    assert context.shape == (3, 77, HIDDEN) and single.shape == (1, 77, HIDDEN)
    assert torch.isfinite(context).all()
    assert not torch.allclose(context[0], context[1])
    assert not torch.allclose(context[0], context[2])
    torch.testing.assert_close(single[0], context[0], rtol=1e-5, atol=1e-6)


def test_tokenize_pads_and_handles_empty_prompt(encoder: TextEncoder):
    tok = encoder.tokenizer
    ids = encoder.tokenize(["", "A Handwritten Digit 7"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, 0] == tok.bos_token_id and ids[0, 1:].eq(tok.eos_token_id).all()
    assert ids[1].tolist()[:6] == tok("a handwritten digit 7")["input_ids"]
    with pytest.raises(ValueError):
        encoder.tokenize([])


def test_penultimate_layer_is_second_to_last_hidden_state_through_final_norm(encoder: TextEncoder):
    ids = encoder.tokenize(["a small blue square on the right", "a handwritten digit 3"])
    penultimate = TextEncoder(encoder.model, encoder.tokenizer, layer="penultimate")
    with torch.no_grad():
        last = encoder(ids)
        pen = penultimate(ids)
        out = encoder.model(input_ids=ids, output_hidden_states=True)
        manual = encoder.model.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(last, out.last_hidden_state)
    torch.testing.assert_close(pen, manual)
    assert pen.shape == last.shape and not torch.allclose(pen, last)


def test_unknown_layer_and_bad_sizes_raise(encoder: TextEncoder, tokenizer_dir: Path):
    with pytest.raises(ValueError, match="layer"):
        TextEncoder(encoder.model, encoder.tokenizer, layer="pooled")
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(encoder.model, encoder.tokenizer, max_length=78)
    with pytest.raises(ValueError, match="divisible"):
        new_text_encoder(tokenizer_dir, TextEncoderConfig(hidden_size=30, num_heads=4))


def test_truncation_warns_with_prompt_and_dropped_count(encoder: TextEncoder):
    long_prompt = "a handwritten digit 7 " * 20  # 80 words + bos/eos
    with pytest.warns(UserWarning, match=r"'a handwritten digit 7.*dropping 5 tokens"):
        ids = encoder.tokenize(["a red circle", long_prompt])
    assert ids.shape == (2, 77) and ids[1, -1] == encoder.tokenizer.eos_token_id
    exactly_77 = "a handwritten digit 7 " * 18 + "a red circle"  # 75 words + bos/eos
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = encoder.tokenize(["a red circle", exactly_77])
    assert ids[1, -1] == encoder.tokenizer.eos_token_id and ids[1, -2] != encoder.tokenizer.eos_token_id
    with pytest.warns(UserWarning, match="dropping 1 tokens"):
        encoder.tokenize(exactly_77 + " left")


def test_freeze(encoder: TextEncoder):
    encoder.train()
    assert encoder.trainable and encoder.model.training
    encoder.freeze()
    assert not encoder.trainable and encoder.frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # e.g. a LightningModule switching to training
    assert not encoder.model.training
    encoder.unfreeze().train()
    assert encoder.trainable and encoder.model.training


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_save_pretrained_round_trip_is_bit_identical(encoder: TextEncoder, tmp_path: Path, layer: str):
    encoder.layer = layer
    prompts = ["a handwritten digit 7", "", "an unseen zebra 🦓"]
    with torch.no_grad():
        before = encoder.encode(prompts)
    root = encoder.save_pretrained(tmp_path / "pipe")
    assert (root / "text_encoder" / "model.safetensors").is_file()
    assert (root / "tokenizer" / "tokenizer.json").is_file()
    # The tokenizer's padding state from the last call must not leak into the saved file.
    assert json.loads((root / "tokenizer" / "tokenizer.json").read_text())["padding"] is None
    loaded = load_text_encoder(root)
    assert (loaded.layer, loaded.max_length, loaded.hidden_size) == (layer, 77, HIDDEN)
    with torch.no_grad():
        after = loaded.encode(prompts)
    assert torch.equal(before, after)
    assert torch.equal(loaded.tokenize(prompts), encoder.tokenize(prompts))
    # Explicit arguments win over what was recorded.
    assert load_text_encoder(root, layer="last", max_length=20).tokenize("").shape == (1, 20)


def test_from_pretrained_flat_folder_and_explicit_subfolders(encoder: TextEncoder, tmp_path: Path):
    root = encoder.save_pretrained(tmp_path / "pipe")
    flat = tmp_path / "flat"
    shutil.copytree(root / "text_encoder", flat)
    for f in (root / "tokenizer").iterdir():
        shutil.copy(f, flat / f.name)
    with torch.no_grad():
        expected = encoder.encode("a red circle")
        assert torch.equal(load_text_encoder(str(flat)).encode("a red circle"), expected)
        renamed = tmp_path / "renamed"
        shutil.copytree(root / "text_encoder", renamed / "te")
        shutil.copytree(root / "tokenizer", renamed / "tok")
        loaded = load_text_encoder(renamed, subfolder_model="te", subfolder_tokenizer="tok")
        assert torch.equal(loaded.encode("a red circle"), expected)
    # Loading works with the plain transformers classes too.
    assert isinstance(CLIPTextModel.from_pretrained(root / "text_encoder"), CLIPTextModel)
    assert len(CLIPTokenizer.from_pretrained(root / "tokenizer")) == len(encoder.tokenizer)


def test_from_pretrained_missing_or_incomplete_path_names_it(tmp_path: Path, encoder: TextEncoder):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_text_encoder(missing)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_text_encoder(str(missing))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_folder"):
        load_text_encoder(empty)
    no_tokenizer = tmp_path / "no_tokenizer"
    encoder.model.save_pretrained(no_tokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_text_encoder(no_tokenizer)
