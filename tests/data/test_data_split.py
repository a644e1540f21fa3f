"""split_records: explicit split labels, a stable hash split, and a non-empty validation set."""

from __future__ import annotations

import random

import pytest

from ldm.data.records import ImageRecord
from ldm.data.split import path_hash_fraction, split_records


def _records(names, **metadata):
    return [ImageRecord(name, [name], dict(metadata)) for name in names]


def test_hash_split_is_order_independent_and_stable_when_files_are_added():
    names = [f"img/{i:04d}.png" for i in range(500)]
    train, val = split_records(_records(names), 0.2)
    val_names = {r.path for r in val}
    assert 60 <= len(val_names) <= 140  # about 20% of 500
    assert len(train) + len(val) == 500
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    _, val_shuffled = split_records(_records(shuffled), 0.2)
    assert {r.path for r in val_shuffled} == val_names
    more = names + [f"new/{i}.png" for i in range(200)]
    _, val_more = split_records(_records(more), 0.2)
    assert {r.path for r in val_more if r.path.startswith("img/")} == val_names


def test_order_within_parts_is_kept():
    names = [f"{i}.png" for i in range(50)]
    train, val = split_records(_records(names), 0.3)
    assert [r.path for r in train] == [n for n in names if n in {r.path for r in train}]
    assert [r.path for r in val] == [n for n in names if n in {r.path for r in val}]


def test_explicit_split_labels_win():
    records = _records(["a.png", "b.png"], split="train") + _records(
        ["c.png"], split="validation"
    ) + _records(["d.png"], split="val") + _records(["e.png"], split="TEST")
    train, val = split_records(records, 0.5)
    assert [r.path for r in train] == ["a.png", "b.png"]
    assert [r.path for r in val] == ["c.png", "d.png", "e.png"]


def test_unknown_split_label_is_refused():
    with pytest.raises(ValueError, match="'holdout'"):
        split_records(_records(["a.png"], split="holdout"), 0.1)


def test_validation_is_never_empty_with_two_or_more_records():
    names = ["x.png", "y.png", "z.png"]
    assert all(path_hash_fraction(n) >= 1e-9 for n in names)  # the hash alone selects none
    train, val = split_records(_records(names), 1e-9)
    smallest = min(names, key=path_hash_fraction)
    assert [r.path for r in val] == [smallest]
    assert len(train) == 2
    train, val = split_records(_records(["only.png"]), 0.5)
    assert len(train) + len(val) == 1


def test_zero_fraction_means_no_validation_and_bad_fractions_fail():
    train, val = split_records(_records([f"{i}.png" for i in range(20)]), 0.0)
    assert len(train) == 20 and val == []
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            split_records([], bad)


def test_hash_is_sha1_based_and_fixed():
    # pinned value: the split must not change between versions or machines
    assert path_hash_fraction("images/00042.png") == pytest.approx(
        int("de8647ff435215fe", 16) / 2**64
    )
