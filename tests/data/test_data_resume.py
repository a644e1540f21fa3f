"""The training order: one seeded global batch list per epoch, split across ranks and workers, and a run killed
mid-epoch and resumed from its last checkpoint sees exactly the batches the uninterrupted run saw."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_dataset
from torch.utils.data import DataLoader

from ldm.data.epoch_plan import EpochPlan, PlannedBatches, shuffled_order

SCRIPT = Path(__file__).parents[1] / "scripts" / "record_data_order.py"


# ----- the plan ----------------------------------------------------------------------------------------


def test_plan_is_a_function_of_seed_and_epoch():
    plan = EpochPlan([range(50)], batch_size=4, seed=1)
    assert plan.batches(0) == EpochPlan([range(50)], batch_size=4, seed=1).batches(0)
    assert plan.batches(0) != plan.batches(1) and plan.batches(0) != EpochPlan([range(50)], 4, seed=2).batches(0)
    batches = plan.batches(0)
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)  # 50 // 4, the partial batch dropped
    assert len({i for b in batches for i in b}) == 48
    unshuffled = EpochPlan([range(10)], batch_size=4, shuffle=False, drop_last=False).batches(0)
    assert unshuffled == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_groups_never_share_a_batch_and_all_are_covered():
    groups = [list(range(0, 30)), list(range(30, 42)), list(range(42, 50))]
    batches = EpochPlan(groups, batch_size=4, seed=0).batches(3)
    group_of = {i: g for g, items in enumerate(groups) for i in items}
    assert all(len({group_of[i] for i in b}) == 1 for b in batches)
    covered = [i for b in batches for i in b]
    assert len(covered) == len(set(covered)) == 48  # group 0's partial batch (2 items) dropped
    assert set(covered) >= set(range(30, 50))  # the small groups divide by 4: nothing dropped
    # the groups' batches are interleaved, not one group after the other
    assert [group_of[b[0]] for b in batches] != sorted(group_of[b[0]] for b in batches)


def test_ranks_and_workers_get_disjoint_shares_in_plan_order():
    dataset = [{"index": i} for i in range(64)]
    plan = EpochPlan([range(64)], batch_size=2, seed=5, world_size=2)
    seen = {}
    for rank in range(2):
        batches = PlannedBatches(dataset, plan, rank)
        batches.epoch = 1
        loader = DataLoader(batches, batch_size=None, num_workers=2)
        seen[rank] = [b["index"].tolist() for b in loader]
        assert seen[rank] == plan.rank_batches(1, rank)  # two workers, handed out in the plan's order
        assert len(seen[rank]) == len(batches) == 16
    flat = [i for rank in seen for b in seen[rank] for i in b]
    assert sorted(flat) == list(range(64))  # disjoint and complete across 2 ranks x 2 workers


class _Draws:
    """Items that draw from the global torch RNG while loaded, as a random caption, crop or flip does."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "draw": torch.randint(1_000_000, ())}


def test_item_draws_depend_on_seed_epoch_and_position_only():
    plan = EpochPlan([range(32)], batch_size=2, seed=3)

    def run(consumed: int = 0, workers: int = 0, epoch: int = 1) -> list[tuple[list[int], list[int]]]:
        batches = PlannedBatches(_Draws(), plan)
        batches.epoch, batches.consumed = epoch, consumed
        # its own generator for the worker seeds, as ResumableTrainData.planned_loader gives it
        loader = DataLoader(batches, batch_size=None, num_workers=workers, generator=torch.Generator().manual_seed(0))
        return [(b["index"].tolist(), b["draw"].tolist()) for b in loader]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    full = run()
    assert torch.equal(torch.get_rng_state(), before)  # loading left the training process's RNG alone
    assert run(consumed=5) == full[5:]  # a resumed epoch draws what the straight one drew
    assert run(workers=2) == full  # whichever worker loads a batch
    torch.manual_seed(1)
    assert run() == full  # whatever the global RNG held
    assert [d for _, d in run(epoch=2)] != [d for _, d in full]  # another epoch draws anew
    draws = [x for _, d in full for x in d]
    assert len(set(draws)) == len(draws)  # and items of one epoch do not repeat each other's draws


def test_resume_count_and_world_size_change():
    plan = EpochPlan([range(40)], batch_size=2, seed=0, world_size=2)
    full = plan.rank_batches(0, 1)
    assert plan.rank_batches(0, 1, consumed=6) == full[3:]  # 6 global batches = 3 per rank
    # Resumed on 4 ranks after 6 global batches on 2: restart at 4 (a multiple of 4), re-showing 2 batches.
    wider = EpochPlan([range(40)], batch_size=2, seed=0, world_size=4)
    assert wider.rank_batches(0, 0, consumed=6) == wider.batches(0)[4:][0::4]


def test_chunk_local_shuffle_keeps_windows_of_chunks_together():
    sizes = [5] * 8
    order = shuffled_order(range(40), torch.Generator().manual_seed(0), sizes, window=2)
    assert sorted(order) == list(range(40)) and order != list(range(40))
    for w in range(0, 40, 10):  # each run of 10 items comes from exactly 2 chunks
        assert len({i // 5 for i in order[w : w + 10]}) == 2
    with pytest.raises(ValueError, match="chunk_sizes"):
        shuffled_order(range(10), torch.Generator(), [3, 3])


# ----- kill and resume, end to end ------------------------------------------------------------------


def _run(args: list[str], out: Path, expect_kill: bool = False) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("run hung:\n" + output[-3000:])
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, output[-3000:]
    else:
        assert proc.returncode == 0, output[-5000:]


def _order(out: Path, rank: int) -> list[tuple[int, list[int]]]:
    lines = (out / f"order-rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["index"]) for r in map(json.loads, lines)]


# 22 images in batches of 4: 5 steps per epoch; 38 on 2 ranks: 9 batches, 8 usable, 4 steps per rank and epoch.
@pytest.mark.parametrize("devices, workers, images, per_epoch, streaming", [(1, 2, 22, 5, False), (2, 0, 38, 4, False),
                                                                            (1, 2, 22, 5, True)])
def test_killed_run_resumes_with_exactly_the_uninterrupted_batches(tmp_path, devices, workers, images, per_epoch, streaming):
    data = write_tiny_dataset(tmp_path / "data", n=images, size=8)
    common = ["--max-steps", "9", "--devices", str(devices), "--workers", str(workers)]
    if streaming:  # litdata shards in several chunks, read chunk-locally
        from ldm.data.shards import optimize_dataset

        optimize_dataset(str(data), tmp_path / "shards", chunk_bytes="1KB", val_fraction=0.0)
        common += ["--shards", str(tmp_path / "shards")]
    _run([str(data), str(tmp_path / "full"), *common], tmp_path / "full")
    _run([str(data), str(tmp_path / "cut"), *common, "--kill-at", "6"], tmp_path / "cut", expect_kill=True)
    assert (tmp_path / "cut" / "ckpt" / "last.ckpt").is_file()
    _run([str(data), str(tmp_path / "cut"), *common, "--resume"], tmp_path / "cut")
    for rank in range(devices):
        full, resumed = _order(tmp_path / "full", rank), _order(tmp_path / "cut", rank)
        assert [s for s, _ in full] == list(range(9))
        assert resumed == full  # steps 0-5 before the kill, 6-8 after it: the same samples in the same order
        # The kill falls inside an epoch (not at its boundary), and epochs do reshuffle.
        assert 6 % per_epoch != 0 and full[0][1] != full[per_epoch][1]
    if devices == 2:
        steps = [set(i for _, b in _order(tmp_path / "full", r)[:per_epoch] for i in b) for r in range(2)]
        assert not steps[0] & steps[1]  # the ranks split each epoch
