"""Quality vs sampler steps on the demo model: fidelity (FD_digits) and prompt accuracy per sampler and step count.

For DDIM, DPM-Solver++ 2M, Euler, Heun and Euler-a at 5/10/20/50 steps, and DDPM at 1000 steps as
the reference, generates ``--per-digit`` samples of each "a handwritten digit d" (same seeds for every
sampler) and scores them as `ldm evaluate digits` does: prompt accuracy, FD_digits (with its
real-vs-real floor) and diversity. Prints a table and writes a PNG plot (FD_digits and accuracy vs
steps, one line per sampler, the DDPM-1000 figure and the floor as horizontal lines).

    .venv/bin/python benchmarks/quality_vs_steps.py --model checkpoints/demo [--per-digit 20] [--out outputs/quality_vs_steps.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SAMPLERS = ("ddim", "dpmpp_2m", "euler", "heun", "euler_a")
STEPS = (5, 10, 20, 50)


def main() -> None:
    from ldm.threads import apply_thread_policy

    apply_thread_policy()
    import torch

    from ldm.evaluation.digit_accuracy import evaluate_digit_prompts
    from ldm.pipeline import LatentDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/demo", help="exported demo model (make demo writes it)")
    parser.add_argument("--per-digit", type=int, default=20, help="samples per digit (x10 per configuration)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3, the demo's)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="step counts")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), help="samplers")
    parser.add_argument("--reference-steps", type=int, default=1000, help="DDPM steps of the reference row (0: none)")
    parser.add_argument("--out", default="outputs/quality_vs_steps.png", help="PNG plot to write (JSON beside it)")
    args = parser.parse_args()

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    print(f"{args.model}; {args.per_digit * 10} samples per row, guidance {args.guidance}, {torch.get_num_threads()} threads")
    rows = []

    def run(sampler: str, steps: int) -> dict:
        start = time.perf_counter()
        r = evaluate_digit_prompts(pipe, steps=steps, guidance=args.guidance, sampler=sampler, per_digit=args.per_digit)
        row = {"sampler": sampler, "steps": steps, "nfe": steps * (2 if sampler == "heun" else 1), "accuracy": r["accuracy"],
               "fd_digits": r["fd_digits"], "fd_floor": r["fd_floor"], "fd_floor_std": r["fd_floor_std"],
               "diversity": r["diversity"], "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"{sampler:9s} {steps:5d} {row['nfe']:5d} {100 * row['accuracy']:7.1f}% {row['fd_digits']:9.2f} "
              f"{row['diversity']:9.2f} {row['seconds']:7.1f}", flush=True)
        return row

    print("sampler   steps   NFE accuracy FD_digits diversity seconds")
    reference = run("ddpm", args.reference_steps) if args.reference_steps else None
    for sampler in args.samplers:
        for steps in args.steps:
            run(sampler, steps)
    floor = rows[0]
    print(f"real-vs-real floor of FD_digits at {args.per_digit * 10} samples: {floor['fd_floor']:.2f} +- {floor['fd_floor_std']:.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    _plot(rows, reference, out, args)
    print(f"Wrote {out} and {out.with_suffix('.json')}")


def _plot(rows: list[dict], reference: dict | None, out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for sampler in args.samplers:
        mine = [r for r in rows if r["sampler"] == sampler]
        ax_fd.plot([r["steps"] for r in mine], [r["fd_digits"] for r in mine], marker="o", label=sampler)
        ax_acc.plot([r["steps"] for r in mine], [100 * r["accuracy"] for r in mine], marker="o", label=sampler)
    if reference is not None:
        ax_fd.axhline(reference["fd_digits"], color="k", ls="--", lw=1, label=f"ddpm {reference['steps']}")
        ax_acc.axhline(100 * reference["accuracy"], color="k", ls="--", lw=1, label=f"ddpm {reference['steps']}")
    ax_fd.axhline(rows[0]["fd_floor"], color="grey", ls=":", lw=1, label="real-vs-real floor")
    for ax, label in ((ax_fd, "FD_digits (lower is better)"), (ax_acc, "prompt accuracy (%)")):
        ax.set_xscale("log")
        ax.minorticks_off()  # only the step counts as tick labels
        ax.set_xticks(args.steps, [str(s) for s in args.steps])
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_fd.legend(fontsize=8)
    fig.suptitle(f"{args.model}: {args.per_digit * 10} samples per point, guidance {args.guidance}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
