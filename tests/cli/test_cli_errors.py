"""The `ldm` command on bad input: one-line errors and exit status 2 (usage) or 1 (runtime), tracebacks only with
--debug; checkpoints a kill cannot damage; `--ckpt_path last` resumes from the newest checkpoint that loads."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ldm.cli import main
from ldm.cli_errors import is_expected, one_line, root_cause
from ldm.models.checkpoint_io import AtomicCheckpointIO, newest_valid_checkpoint, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[2]


def _run(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    return stop.value.code, err


def test_a_missing_model_is_one_line_and_exit_1(tmp_path, capsys):
    code, err = _run(["generate", "a cat", "--model", str(tmp_path / "nowhere")], capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ldm generate: error: FileNotFoundError:")
    assert str(tmp_path / "nowhere") in lines[0] and "Traceback" not in err and "--debug" in lines[0]


def test_debug_shows_the_real_exception(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["--debug", "generate", "a cat", "--model", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("args, option", [
    (["--guidance", "nan"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),
    (["--strength", "0", "--init-image", "x.png"], "--strength"),
    (["--strength", "1.5", "--init-image", "x.png"], "--strength"),
    (["--num-images", "0"], "--num-images"),
    (["--height", "-64"], "--height"),
    (["--steps", "0"], "--steps"),
    (["--lora-scale", "nan"], "--lora-scale"),
])
def test_bad_numbers_are_usage_errors_before_anything_loads(tmp_path, capsys, args, option):
    code, err = _run(["generate", "a cat", "--model", str(tmp_path / "nowhere"), *args], capsys)
    assert code == 2 and f"argument {option}" in err and "Traceback" not in err


def test_data_commands_check_numbers_too(tmp_path, capsys):
    code, err = _run(["data", "prepare", "shapes", "--out", str(tmp_path / "s"), "--num-images", "-3"], capsys)
    assert code == 2 and "argument --num-images" in err


def test_data_commands_refuse_links_out_of_the_folder_unless_asked(tmp_path, tiny_dataset, capsys):
    outside = tmp_path / "elsewhere.png"
    shutil.move(tiny_dataset / "images" / "003.png", outside)
    (tiny_dataset / "images" / "003.png").symlink_to(outside)
    code, err = _run(["data", "tokenizer", str(tiny_dataset), "--out", str(tmp_path / "tok")], capsys)
    assert code == 1 and "003.png" in err and "--data.follow_symlinks" in err and "Traceback" not in err
    main(["data", "tokenizer", str(tiny_dataset), "--out", str(tmp_path / "tok"), "--follow-symlinks"])
    assert "Trained a tokenizer on" in capsys.readouterr().out
    code, err = _run(["data", "optimize", str(tiny_dataset), "--out", str(tmp_path / "s"), "--max-image-pixels", "0"], capsys)
    assert code == 2 and "argument --max-image-pixels" in err


def test_a_bad_init_from_surfaces_the_real_cause_not_jsonargparse(tmp_path, capsys):
    code, err = _run(["fit", "--model", "ldm.models.LatentDiffusion", "--model.init_from", str(tmp_path / "missing.safetensors"),
                      "--data.root", str(tmp_path), "--trainer.logger", "false"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("ldm fit: error: FileNotFoundError:") and "missing.safetensors" in line
    assert "Does not validate" not in err and "Namespace(" not in err


def test_a_damaged_init_from_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a model at all")
    code, err = _run(["fit", "--model", "ldm.models.LatentDiffusion", "--model.init_from", str(bad),
                      "--data.root", str(tmp_path), "--trainer.logger", "false"], capsys)
    assert code == 2 and "Does not validate" not in err
    assert f"{bad} is not a readable .safetensors file" in err.strip().splitlines()[-1]


def test_unexpected_errors_keep_their_traceback():
    assert not is_expected(RuntimeError("a bug"))
    assert is_expected(ValueError("bad value")) and is_expected(FileNotFoundError("x"))

    class OurError(RuntimeError):
        pass

    OurError.__module__ = "ldm.models.something"
    assert is_expected(OurError("ours"))
    assert one_line(ValueError("first\n  second\n")) == "first; second"


def test_root_cause_unwraps_jsonargparse_only():
    from jsonargparse._typehints import raise_union_unexpected_value

    inner = ValueError("size must be >= 0")
    try:
        try:
            raise inner
        except ValueError as exc:  # jsonargparse wraps a class's error in its union error, raised from the first
            raise_union_unexpected_value([int, type(None)], {"size": -1}, [exc])
    except ValueError as wrapper:
        assert "Does not validate" in str(wrapper)
        assert root_cause(wrapper) is inner
    ours = ValueError("names the file")
    ours.__cause__ = KeyError("low level")
    assert root_cause(ours) is ours  # our own wrappers are kept: they carry the context


def test_atomic_checkpoint_io_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 3
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]

    def dies_mid_write(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {}, "global_step": 4}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["global_step"] == 3  # the old checkpoint is intact
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_a_killed_save_is_cleaned_and_the_newest_loadable_checkpoint_wins(tmp_path, caplog):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save = AtomicCheckpointIO().save_checkpoint
    save({"state_dict": {}, "global_step": 4}, folder / "last.ckpt")
    save({"state_dict": {}, "global_step": 5}, folder / "step=5.ckpt")
    whole = (folder / "step=5.ckpt").read_bytes()
    (folder / "step=6.ckpt").write_bytes(whole[: len(whole) // 2])  # damaged
    (folder / "notes.ckpt").write_bytes(b"not a checkpoint")
    stale = folder / ".last.ckpt.tmp-4242"  # what SIGKILL during a save leaves
    stale.write_bytes(b"partial")

    assert remove_stale_temp_files([folder, tmp_path / "absent"]) == [stale] and not stale.exists()
    assert newest_valid_checkpoint([folder]) == folder / "step=5.ckpt"
    assert "step=6.ckpt" in caplog.text and "notes.ckpt" in caplog.text
    assert newest_valid_checkpoint([tmp_path / "absent"]) is None


def test_fit_resumes_from_the_newest_checkpoint_when_last_is_behind(tmp_path, tiny_dataset, tiny_vae_kwargs, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = []
    atomic_save = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", lambda self, c, path, *a, **k: saved.append(path) or atomic_save(self, c, path, *a, **k))
    base = yaml.safe_load((REPO / "configs" / "autoencoder" / "digits.yaml").read_text())
    base["model"]["init_args"].update(tiny_vae_kwargs, disc_start=100, scale_factor_batches=1)
    base["data"] = {"root": str(tiny_dataset), "batch_size": 4, "val_fraction": 0.25}
    base["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                           check_val_every_n_epoch=1, logger=False)
    base["trainer"]["callbacks"] = [cb for cb in base["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    base["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(tmp_path / "ckpts"), every_n_epochs=1, save_top_k=-1,
                                                        monitor=None, filename="step={step}")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(base))
    folder = tmp_path / "ckpts"

    main(["fit", "--config", str(config)])
    behind = torch.load(folder / "last.ckpt", weights_only=True)
    shutil.copy(folder / "last.ckpt", tmp_path / "behind.ckpt")
    main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    ahead = torch.load(folder / "last.ckpt", weights_only=True)
    assert ahead["global_step"] > behind["global_step"]
    assert saved and all(Path(p).parent == folder for p in saved)  # every save went through the atomic writer
    # A kill between the step checkpoint and last.ckpt: last.ckpt is one save behind, plus a half-written file.
    shutil.copy(tmp_path / "behind.ckpt", folder / "last.ckpt")
    (folder / ".last.ckpt.tmp-99999").write_bytes(b"partial")
    capsys.readouterr()
    from ldm.models import AutoencoderKL

    batches = []
    training_step = AutoencoderKL.training_step
    monkeypatch.setattr(AutoencoderKL, "training_step", lambda self, *a, **k: batches.append(1) or training_step(self, *a, **k))
    main(["fit", "--config", str(config), "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert len(batches) == 2  # one epoch of limit_train_batches=2: it went on from epoch 2, not from epoch 1
    err = capsys.readouterr().err
    assert "Resuming from" in err and "last.ckpt (" not in err.split("Resuming from")[1].splitlines()[0]
    final = torch.load(folder / "last.ckpt", weights_only=True)
    assert final["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == 3  # went on from epoch 2, not 1
    assert not (folder / ".last.ckpt.tmp-99999").exists()


def test_the_console_script_exits_nonzero_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ldm.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "ldm"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "nope" in out.stderr
