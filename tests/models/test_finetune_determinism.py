"""A fine-tune is repeatable: the shipped demo LoRA config, run twice with the same seed on the same machine, writes
bit-identical adapters, whether the first run builds the latent cache and the second reads it, or neither has one; and
a run stopped in the middle of an epoch and resumed with ``--ckpt_path last`` ends with the same adapters as one that
ran straight through (the images have two captions each, so the caption drawn per item must resume too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from ldm.cli import main

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from conftest import save_tiny_base_model

    assets, folder = save_tiny_base_model(tmp_path_factory.mktemp("base"))
    return folder, assets["data"]


CONFIG = ROOT / "configs" / "finetune" / "demo-lora.yaml"


def _fit(run_dir: Path, base: Path, data: Path, cache: Path | None, *extra: str, config: Path = CONFIG) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["fit", "--config", str(config), "--model.init_from", str(base),
            "--data.root", str(data), "--data.batch_size", "4", "--data.val_fraction", "0.25",
            "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--model.validation.steps", "2", "--model.validation.prompts", "[image 1]",
            "--model.cache_dir", str(cache) if cache else "null", *extra]
    import os

    cwd = os.getcwd()
    os.chdir(run_dir)  # the config's relative output folders land in run_dir
    try:
        main(args)
    finally:
        os.chdir(cwd)
    (adapter,) = run_dir.rglob(ADAPTER)
    return load_file(adapter)


def _with_rows(data: Path, out: Path, change) -> Path:
    """A copy of the tiny dataset with each metadata row replaced by ``change(index, row)``."""
    import json
    import shutil

    shutil.copytree(data, out)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    (out / "metadata.jsonl").write_text("".join(json.dumps(change(i, row)) + "\n" for i, row in enumerate(rows)))
    return out


def _with_row_rates(data: Path, out: Path) -> Path:
    """A copy of the tiny dataset whose even rows carry their own ``caption_dropout`` (0.05)."""
    return _with_rows(data, out, lambda i, row: {**row, "caption_dropout": 0.05} if i % 2 == 0 else row)


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not a[k].equal(b[k])]
    assert not different, f"{len(different)} of {len(a)} adapter tensors differ, e.g. {different[:3]}"


def test_two_runs_of_the_demo_lora_config_write_identical_adapters(tiny_base, tmp_path):
    base, data = tiny_base
    cache = tmp_path / "cache"
    first = _fit(tmp_path / "a", base, data, cache)  # builds the latent cache
    assert any(cache.iterdir())
    second = _fit(tmp_path / "b", base, data, cache)  # reads it
    _assert_identical(first, second)
    third = _fit(tmp_path / "c", base, data, None)  # encodes every batch
    fourth = _fit(tmp_path / "d", base, data, None)
    _assert_identical(third, fourth)
    # Encoding a repeated caption once (the config's default) is as repeatable, and so is encoding every row: on data
    # with two captions, so that every batch repeats one.
    few = _with_rows(data, tmp_path / "few", lambda i, row: {**row, "text": ["image 1", "picture 2"]})
    for once in ("true", "false"):
        runs = [_fit(tmp_path / f"{once}-{name}", base, few, None, "--model.encode_repeated_captions_once", once) for name in "ef"]
        _assert_identical(*runs)


def test_another_seed_gives_another_adapter(tiny_base, tmp_path):
    base, data = tiny_base
    first = _fit(tmp_path / "a", base, data, tmp_path / "cache")
    other = _fit(tmp_path / "b", base, data, tmp_path / "cache", "--seed_everything", "1", "--model.seed", "1", "--data.seed", "1")
    assert any(not first[k].equal(other[k]) for k in first)


def test_a_run_resumed_mid_epoch_ends_with_the_adapters_of_a_straight_run(tiny_base, tmp_path):
    import yaml

    base, data = tiny_base
    data = _with_row_rates(data, tmp_path / "data")  # as the mirrored set: some rows with their own caption dropout
    config = yaml.safe_load(CONFIG.read_text())
    (checkpoint,) = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    checkpoint["init_args"]["every_n_train_steps"] = 3  # 18 training images in batches of 4: 4 steps per epoch
    config_path = tmp_path / "demo-lora.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cache = tmp_path / "cache"
    straight = _fit(tmp_path / "straight", base, data, cache, config=config_path)
    _fit(tmp_path / "resumed", base, data, cache, "--trainer.max_steps", "3", config=config_path)
    resumed = _fit(tmp_path / "resumed", base, data, cache, "--ckpt_path", "last", config=config_path)
    _assert_identical(straight, resumed)
