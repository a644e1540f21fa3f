"""Cold import time of the inference API next to the training stack, each in fresh interpreters (side by side).

    .venv/bin/python benchmarks/import_time.py [--repeats 5]

Prints the median wall time of ``from ldm import LatentDiffusionPipeline`` (what ``pipe = ...from_pretrained``
needs) and of ``import ldm.models`` (the LightningModules), next to the floor every path pays (torch and
transformers' CLIP), and whether Lightning was imported by each. The
first run warms the OS file cache and is not counted. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

PROBE = """
import sys, time
t = time.perf_counter()
{statement}
elapsed = time.perf_counter() - t
print(elapsed, any(m.split('.')[0] == 'lightning' for m in sys.modules))
"""

CASES = {
    "floor: import torch, transformers' CLIP": "import torch; from transformers import CLIPTextModel",
    "inference: from ldm import LatentDiffusionPipeline": "from ldm import LatentDiffusionPipeline",
    "training: import ldm.models": "import ldm.models",
}


def measure(statement: str, repeats: int) -> tuple[float, bool]:
    times, lightning = [], False
    for i in range(repeats + 1):
        out = subprocess.run([sys.executable, "-c", PROBE.format(statement=statement)], capture_output=True, text=True,
                             check=True).stdout.split()
        if i:  # the first run warms the file cache
            times.append(float(out[0]))
        lightning = out[1] == "True"
    return statistics.median(times), lightning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {name: measure(statement, args.repeats) for name, statement in CASES.items()}
    for name, (seconds, lightning) in results.items():
        print(f"{name:55s} {seconds:6.2f} s   lightning imported: {lightning}")
    (floor, _), (inference, _), (training, _) = results.values()
    print(f"inference import / training import: {inference / training:.2f}x; ldm's own share of the inference "
          f"import: {inference - floor:.2f} s")


if __name__ == "__main__":
    main()
