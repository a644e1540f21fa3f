"""The caption-trained CLIP-style BPE tokenizer loads in transformers and behaves like CLIP's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from ldm.data.tokenizer import BOS_TOKEN, EOS_TOKEN, NUM_BASE_TOKENS, train_clip_tokenizer

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = ["red", "green", "blue", "yellow", "black"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom"]

CAPTIONS = (
    [f"a handwritten digit {d}" for d in range(10)]
    + [f"the number {n}" for n in NUMBERS]
    + [f"a small {c} {s} {p}" for c, s, p in zip(COLOURS * 4, SHAPES * 7, PLACES * 5)]
    + [f"a {c} {s} above a {c2} {s2}" for c, s, c2, s2 in zip(COLOURS, SHAPES * 2, reversed(COLOURS), SHAPES[::-1] * 2)]
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_clip_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok"), vocab_size=800)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def test_folder_has_the_usual_files_and_special_tokens(tokenizer_dir: Path, tokenizer: CLIPTokenizer):
    assert len(CAPTIONS) >= 40
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tokenizer_dir / name).is_file(), name
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.unk_token == EOS_TOKEN
    assert tokenizer.model_max_length == 77
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert tokenizer.get_vocab() == vocab
    # CLIP layout: 512 byte tokens first, learned merges, bos and eos last.
    assert NUM_BASE_TOKENS < len(vocab) <= 800
    assert (vocab[BOS_TOKEN], vocab[EOS_TOKEN]) == (len(vocab) - 2, len(vocab) - 1)
    assert "handwritten</w>" in vocab  # frequent word became one token


def test_vocab_size_caps_the_number_of_merges(tmp_path: Path):
    small = CLIPTokenizer.from_pretrained(train_clip_tokenizer(CAPTIONS, tmp_path, vocab_size=NUM_BASE_TOKENS + 10))
    assert len(small) == NUM_BASE_TOKENS + 10
    with pytest.raises(ValueError, match="vocab_size"):
        train_clip_tokenizer(CAPTIONS, tmp_path / "x", vocab_size=100)


def test_bos_eos_wrap_every_prompt_and_case_is_folded(tokenizer: CLIPTokenizer):
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer("A RED   Circle")["input_ids"] == ids
    assert tokenizer("")["input_ids"] == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "red</w>", "circle</w>"]


def test_decode_round_trips_training_captions(tokenizer: CLIPTokenizer):
    for caption in CAPTIONS + ["A Handwritten DIGIT 7"]:
        ids = tokenizer(caption)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption.lower()


UNSEEN = ["a zebra xylophone", "a 🦓 and a 🔴 circle", "一个红色的圆", "café naïve ÅNGSTRÖM", "\x00\t€"]


@pytest.mark.parametrize("text", UNSEEN)
def test_unseen_text_falls_back_to_bytes_without_unk(tokenizer: CLIPTokenizer, text: str):
    ids = tokenizer(text)["input_ids"]
    inner = ids[1:-1]
    assert inner and tokenizer.unk_token_id not in inner
    expected = " ".join(text.lower().split())
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if text.isprintable():
        assert decoded.replace(" ", "") == expected.replace(" ", "")


def test_padding_and_truncation_to_77(tokenizer: CLIPTokenizer):
    batch = tokenizer(
        ["a red circle", "seven " * 200], padding="max_length", truncation=True, max_length=77, return_tensors="pt"
    )
    ids = batch["input_ids"]
    assert ids.shape == (2, 77)
    assert ids[0, 4:].eq(tokenizer.pad_token_id).all()
    assert ids[1, 0] == tokenizer.bos_token_id and ids[1, -1] == tokenizer.eos_token_id
    assert ids[1, 1:-1].ne(tokenizer.eos_token_id).all()


def test_same_captions_give_identical_files(tokenizer_dir: Path, tmp_path: Path):
    again = train_clip_tokenizer(iter(CAPTIONS), tmp_path / "again", vocab_size=800)
    names = sorted(p.name for p in tokenizer_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tokenizer_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = train_clip_tokenizer(CAPTIONS[:20], tmp_path / "other", vocab_size=800)
    assert (other / "merges.txt").read_bytes() != (tokenizer_dir / "merges.txt").read_bytes()


def test_equally_frequent_pairs_merge_in_a_fixed_order(tmp_path: Path):
    # ("c", "d</w>") and ("a", "b</w>") both occur twice: the tie is broken by sorting, not by hash order.
    out = train_clip_tokenizer(["cd ab", "ab cd"], tmp_path, vocab_size=NUM_BASE_TOKENS + 2)
    assert (out / "merges.txt").read_text().splitlines()[1:] == ["a b</w>", "c d</w>"]
    ids = CLIPTokenizer.from_pretrained(out)("ab cd")["input_ids"]
    assert len(ids) == 4
