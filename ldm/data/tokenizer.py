"""Train a small CLIP-style byte-level BPE tokenizer from captions.

The result is a folder that ``transformers.CLIPTokenizer.from_pretrained`` loads, laid out like
``openai/clip-vit-large-patch14``'s tokenizer: the same normalisation (NFC, whitespace cleanup,
lowercase), the same pre-tokenisation (CLIP's split regex followed by byte-level mapping), words
ending in ``</w>``, ``<|startoftext|>`` as bos and ``<|endoftext|>`` as eos, pad and unk.

The vocabulary always holds every byte, both inside a word and at its end (``"x"`` and
``"x</w>"``), so any text, including words never seen in training, emoji and other scripts,
tokenizes into byte-level pieces instead of unknown tokens. The learned merges come after those
512 base tokens, and the two special tokens come last, as in CLIP.

Example:
    >>> path = train_clip_tokenizer(["a red circle", "a blue square"], "checkpoints/tokenizer")
    >>> tokenizer = CLIPTokenizer.from_pretrained(path)
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
#: Bytes inside a word, bytes ending a word, bos and eos.
NUM_BASE_TOKENS = 256 + 256 + 2


@lru_cache(maxsize=1)
def bytes_to_unicode() -> tuple[str, ...]:
    """The 256 printable characters that byte-level BPE uses for bytes 0..255, in CLIP's order.

    Returns:
        The characters standing for each byte, printable bytes first (GPT-2 / CLIP ordering).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return tuple(chr(c) for c in chars)


def _clip_pipeline_tokenizer() -> Tokenizer:
    """An empty BPE tokenizer with CLIP's normaliser and pre-tokeniser, ready for training."""
    tokenizer = Tokenizer(
        BPE(unk_token=EOS_TOKEN, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD_SUFFIX, fuse_unk=False)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def _word_counts(captions: list[str]) -> Counter[str]:
    """Byte-level words of the captions after CLIP's normalisation and pre-tokenisation, counted."""
    pipeline = _clip_pipeline_tokenizer()
    normalizer, pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    counts: Counter[str] = Counter()
    for caption, repeats in Counter(captions).items():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)):
            if word not in (BOS_TOKEN, EOS_TOKEN):
                counts[word] += repeats
    return counts


def _learn_merges(captions: list[str], num_merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` ranked BPE merges from ``captions``, deterministically.

    ``tokenizers.trainers.BpeTrainer`` breaks ties between equally frequent pairs by internal ids
    that depend on hash-map order, so the same captions can give different merge lists from run to
    run. Here the normalisation and pre-tokenisation are ``tokenizers``' own (CLIP's pipeline), and
    the merges are counted with a fixed tie-break: highest count first, then the pair that sorts first.
    """
    if num_merges <= 0 or not captions:
        return []
    counts = _word_counts(captions)
    words: list[list[str]] = []
    freqs: list[int] = []
    for word, count in sorted(counts.items()):
        words.append([*word[:-1], word[-1] + END_OF_WORD_SUFFIX])
        freqs.append(count)
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for index, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freq
            pair_words[pair].add(index)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and pair_counts:
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < min_frequency:
            break
        merges.append(best)
        merged = best[0] + best[1]
        for index in sorted(pair_words.pop(best, ())):
            symbols, freq = words[index], freqs[index]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= freq
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            new_symbols: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    new_symbols.append(merged)
                    i += 2
                else:
                    new_symbols.append(symbols[i])
                    i += 1
            words[index] = new_symbols
            for pair in zip(new_symbols, new_symbols[1:]):
                pair_counts[pair] += freq
                pair_words[pair].add(index)
        pair_counts.pop(best, None)
    return merges


def build_clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The CLIP-layout vocabulary for a merge list: bytes, end-of-word bytes, merges, bos, eos.

    Args:
        merges: Ranked BPE merges whose parts are base tokens or results of earlier merges.

    Returns:
        Token to id mapping with ids ``0..len-1``; bos and eos are the last two ids.
    """
    byte_chars = bytes_to_unicode()
    tokens = list(byte_chars) + [c + END_OF_WORD_SUFFIX for c in byte_chars]
    tokens += [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def train_clip_tokenizer(
    captions: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    model_max_length: int = 77,
    min_frequency: int = 2,
) -> Path:
    """Train a CLIP-style byte-level BPE tokenizer on captions and save it for ``CLIPTokenizer``.

    The same captions (in the same order) always give byte-identical files.

    Args:
        captions: Training texts, e.g. every caption of the dataset. Iterated once.
        out_dir: Folder to write; created if missing, existing tokenizer files are overwritten.
        vocab_size: Total vocabulary size including the 512 byte tokens and the 2 special tokens;
            at most ``vocab_size - 514`` merges are learned (fewer when the captions run out of
            pairs occurring ``min_frequency`` times).
        model_max_length: Sequence length recorded in the config (CLIP uses 77).
        min_frequency: A pair must occur at least this often to be merged.

    Returns:
        ``out_dir`` as a ``Path``, holding ``tokenizer.json``, ``vocab.json``, ``merges.txt``,
        ``tokenizer_config.json`` and ``special_tokens_map.json``.

    Raises:
        ValueError: If ``vocab_size`` is below 514 or ``model_max_length`` below 2.
    """
    from transformers import CLIPTokenizer

    if vocab_size < NUM_BASE_TOKENS:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level CLIP tokenizer needs at least "
            f"{NUM_BASE_TOKENS} tokens (256 bytes, 256 end-of-word bytes, bos, eos)."
        )
    if model_max_length < 2:
        raise ValueError(f"model_max_length={model_max_length} must leave room for bos and eos (>= 2).")
    caption_list = [str(c) for c in captions]
    merges = _learn_merges(caption_list, vocab_size - NUM_BASE_TOKENS, min_frequency)
    vocab = build_clip_vocab(merges)
    logger.info(
        "Trained CLIP tokenizer on %d captions: %d merges, vocab %d", len(caption_list), len(merges), len(vocab)
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=model_max_length,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    tokenizer.save_pretrained(out)  # tokenizer.json + tokenizer_config.json (transformers v5)
    # The classic files too, so older loaders (transformers v4 slow tokenizer, open_clip-style code) work.
    _write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN},
    )
    return out
