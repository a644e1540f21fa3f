"""Training-step time of the demo's UNet under thread policies, on an idle machine and beside a busy process.

With two cores and torch's default OpenMP threading, a second CPU-bound process makes torch's threads
spin-wait for each other: a demo training step went from ~0.1 s to 1-3 s. This script measures, in
one run, the demo-sized UNet training step (batch 128 of 8x8x4 latents, 64-wide text context, AdamW)
in a fresh subprocess per policy, first alone and then with a competing busy process (one
pure-Python busy loop, i.e. one core taken, like a test run or a second job):

- ``default``: torch's defaults (as many threads as cores, OpenMP's spin-then-sleep waiting);
- ``passive``: the same threads with ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once);
- ``spin-10k``: GNU OpenMP's ``GOMP_SPINCOUNT=10000`` (spin briefly, then sleep; the default spins 300,000 times);
- ``one-thread``: ``OMP_NUM_THREADS=1``.

Prints median ms/step per policy and condition, and each policy's slowdown when the machine is busy.

    .venv/bin/python benchmarks/thread_policy.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}

CHILD = r"""
import json, statistics, sys, time
import torch
from ldm.nn.unet import UNetModel
torch.manual_seed(0)
unet = UNetModel(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                 num_head_channels=32, context_dim=64)
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
x, ctx = torch.randn(128, 4, 8, 8), torch.randn(128, 77, 64)
t = torch.randint(0, 1000, (128,))
times = []
for i in range(int(sys.argv[1]) + 3):
    start = time.perf_counter()
    loss = (unet(x, t, ctx) - x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - start)
print(json.dumps({"ms": 1000 * statistics.median(times), "threads": torch.get_num_threads()}))
"""


def run_child(policy: dict[str, str], steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}
    env.update(policy)
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 3 warm-up steps)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}")
    results: dict[str, dict[str, float]] = {name: {} for name in POLICIES}
    for condition in ("idle", "busy"):
        competitor = None
        if condition == "busy":
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        try:
            for name, policy in POLICIES.items():
                r = run_child(policy, args.steps)
                results[name][condition] = r["ms"]
                print(f"{condition:5s} {name:11s} {r['threads']} threads: {r['ms']:8.1f} ms/step", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    print("\npolicy        idle ms   busy ms   busy/idle   idle vs default   busy vs default")
    for name, r in results.items():
        print(f"{name:11s} {r['idle']:9.1f} {r['busy']:9.1f} {r['busy'] / r['idle']:9.2f}x "
              f"{results['default']['idle'] / r['idle']:15.2f}x {results['default']['busy'] / r['busy']:15.2f}x")


if __name__ == "__main__":
    main()
