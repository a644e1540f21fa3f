"""SIGTERM/SIGUSR1 while training: a checkpoint at the end of the batch, exit status 0, and a resume that continues
from that step (PreemptionCheckpoint, which `ldm fit` always adds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from conftest import TINY_VAE, finish_or_kill
from ldm.data import ImageCaptionDataModule
from ldm.models import AutoencoderKL, PreemptionCheckpoint, PreemptionExit

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from step_marker import read_steps  # noqa: E402


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process at the start of training batch ``batch_idx``."""

    def __init__(self, signum: int, batch_idx: int):
        self.signum, self.batch_idx = signum, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), self.signum)


def _fit(tmp_path: Path, dataset: Path, callbacks, checkpoints: bool = True, ckpt_path: str | None = None,
         max_steps: int = 50) -> pl.Trainer:
    if checkpoints:
        callbacks = [*callbacks, pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=checkpoints, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    model = AutoencoderKL(**TINY_VAE, disc_start=1000, scale_factor_batches=0)
    trainer.fit(model, datamodule=ImageCaptionDataModule(root=str(dataset), batch_size=4, val_fraction=0.25), ckpt_path=ckpt_path)
    return trainer


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_sigusr1_saves_last_ckpt_stops_with_status_0_and_chains_the_previous_handler(tmp_path, tiny_dataset):
    calls = []
    original = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        mine = signal.getsignal(signal.SIGUSR1)
        with pytest.raises(PreemptionExit) as stop:
            _fit(tmp_path, tiny_dataset, [PreemptionCheckpoint(), SignalAt(signal.SIGUSR1, 2)])
        assert stop.value.code == 0 and "SIGUSR1: saved a checkpoint at global step 3" in stop.value.message
        assert _step(tmp_path / "ckpt" / "last.ckpt") == 3  # the end of batch 2, the one the signal arrived in
        assert calls == [signal.SIGUSR1]  # the handler that was there before still ran
        assert signal.getsignal(signal.SIGUSR1) is mine  # and is back in place
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_sigterm_replaces_lightnings_stop_and_keeps_other_handlers(tmp_path, tiny_dataset):
    calls = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        trainer = None

        class Keep(pl.Callback):
            def setup(self, t, *args, **kwargs):
                nonlocal trainer
                trainer = t

        with pytest.raises(PreemptionExit):
            _fit(tmp_path, tiny_dataset, [PreemptionCheckpoint(), SignalAt(signal.SIGTERM, 1), Keep()])
        # Lightning's own SIGTERM notifier did not run (it would have ended fit without a checkpoint), the user's did.
        assert calls == [signal.SIGTERM] and not trainer.received_sigterm
        assert _step(tmp_path / "ckpt" / "last.ckpt") == 2
    finally:
        signal.signal(signal.SIGTERM, original)


def test_under_slurm_lightnings_auto_requeue_handler_still_runs(tmp_path, tiny_dataset, monkeypatch):
    """A (simulated) SLURM job: Lightning's SIGUSR1 handler saves hpc_ckpt_1.ckpt and asks scontrol to requeue (not
    installed here: Lightning logs the failure), then this callback saves last.ckpt and stops cleanly."""
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PreemptionExit):
        _fit(tmp_path, tiny_dataset, [PreemptionCheckpoint(), SignalAt(signal.SIGUSR1, 1)])
    assert _step(tmp_path / "hpc_ckpt_1.ckpt") == 1  # Lightning's, written in its handler as batch 1 started
    assert _step(tmp_path / "ckpt" / "last.ckpt") == 2  # ours, at the end of batch 1


def test_without_model_checkpoint_it_writes_an_hpc_checkpoint_that_resumes(tmp_path, tiny_dataset):
    with pytest.raises(PreemptionExit) as stop:
        _fit(tmp_path, tiny_dataset, [PreemptionCheckpoint(), SignalAt(signal.SIGTERM, 1)], checkpoints=False)
    assert "--ckpt_path hpc" in stop.value.message
    assert _step(tmp_path / "hpc_ckpt_1.ckpt") == 2
    trainer = _fit(tmp_path, tiny_dataset, [], checkpoints=False, ckpt_path="hpc", max_steps=4)
    assert trainer.global_step == 4


def test_unknown_signal_names_are_refused():
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        PreemptionCheckpoint(signals=["SIGNOPE"])
    assert PreemptionCheckpoint(signals=["usr1", "SIGTERM"]).signals == (signal.SIGUSR1, signal.SIGTERM)


# ------------------------------------------------------------------------------------- `ldm fit` in a subprocess
def _config(tmp_path: Path, dataset: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 100_000, "max_epochs": -1, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}},
                {"class_path": "step_marker.StepMarker", "init_args": {"path": str(tmp_path / "steps"), "sleep": 0.02}},
            ],
        },
        "model": {"class_path": "ldm.models.AutoencoderKL",
                  "init_args": {**TINY_VAE, "disc_start": 1000, "scale_factor_batches": 0}},
        "data": {"root": str(dataset), "batch_size": 4, "val_fraction": 0.25},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ldm_fit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ldm.cli", "fit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    return finish_or_kill(proc, timeout, "ldm fit did not exit")


def _signal_after_steps(proc: subprocess.Popen, steps_file: Path, signum: int, steps: int = 2) -> None:
    deadline = time.monotonic() + 120
    while len(read_steps(steps_file)) < steps:
        if proc.poll() is not None or time.monotonic() > deadline:
            output = _finish(proc, 5)
            pytest.fail(f"ldm fit ended or stalled before {steps} steps:\n{output[-3000:]}")
        time.sleep(0.1)
    proc.send_signal(signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_ldm_fit_checkpoints_and_exits_0_on_a_signal_then_resumes_from_that_step(tmp_path, tiny_dataset, signum):
    config = _config(tmp_path, tiny_dataset)
    steps = tmp_path / "steps"
    proc = _ldm_fit("--config", str(config))
    _signal_after_steps(proc, steps, signum)
    sent = time.monotonic()
    output = _finish(proc, 60)
    assert proc.returncode == 0, output[-3000:]
    assert time.monotonic() - sent < 30, "the stop was not prompt"
    reached = read_steps(steps)[-1]  # the step of the last batch that finished
    last = tmp_path / "ckpt" / "last.ckpt"
    assert _step(last) == reached
    assert f"{signal.Signals(signum).name}: saved a checkpoint at global step {reached}" in output
    assert "--ckpt_path last" in output
    if signum == signal.SIGUSR1:
        return

    # The requeued job: same command plus --ckpt_path last, here with an end in sight.
    before = len(read_steps(steps))
    proc = _ldm_fit("--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", str(reached + 3))
    output = _finish(proc, 120)
    assert proc.returncode == 0, output[-3000:]
    assert read_steps(steps)[before:] == [reached + 1, reached + 2, reached + 3]
    assert _step(last) == reached + 3
