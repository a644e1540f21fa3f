"""UNet speed, ours vs diffusers: training step (forward + backward + AdamW) and inference forward, same weights.

Our ``UNetModel`` and diffusers' ``UNet2DConditionModel`` get the same configuration and the same weights (our key
map converts them; the outputs are compared first, so both compute the same thing). For each case and mode the two
models run in turn (ours, theirs, ours, ...) in one process, so both see the same machine state; the script prints
the median milliseconds per call and the ratio diffusers/ours (> 1: ours is faster).

Cases:
  demo      configs/diffusion/digits.yaml's UNet (channels 32, mult [1, 2], 1 res block, attention at both levels,
            32-channel heads, context 64), 8x8x4 latents, 77 tokens, batch 128
  sd-small  SD v1.x's layout at 1/5 width (channels 64, mult [1, 2, 4, 4], 2 res blocks, attention [4, 2, 1],
            8 heads, context 768), 32x32x4 latents, 77 tokens, batch 4
Modes: train-fp32, train-bf16 (CPU/CUDA autocast), infer-fp32, infer-bf16 (forward under torch.no_grad). Training
steps use fused AdamW for both models, as LatentDiffusion does (``--adamw`` picks another implementation).
Each row is the median of 10 interleaved calls per model (3 where one call takes over 2 s; ``--repeats`` fixes it).
On a CPU without AVX-512 (these machines) bf16 convolutions take PyTorch's slow path: bf16 is ~10x slower than fp32
for both models.

``--profile`` then runs torch.profiler on both models for each case and mode and prints the ops with the most
self CPU time side by side (as shares of each model's total: run with OMP_NUM_THREADS=1 and the shares mean
something even on a busy machine). ``--quick`` (batch 2, 8x8 latents, 1 repeat) only checks that the script works;
its figures mean nothing.

    .venv/bin/python benchmarks/unet_step.py                 # the figures (about 9 minutes on 2 idle cores)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unet_step.py --profile --repeats 0 --modes train-fp32 infer-fp32
    .venv/bin/python benchmarks/unet_step.py --quick
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is run
from bench_common import interleaved_times, machine_line, median_ms, parser_from_doc, print_side_by_side, top_ops  # noqa: E402
from unet_pair import DEMO_UNET, SD_SHAPED_SMALL, build_pair, n_params, unet_inputs  # noqa: E402

CASES = {  # name: (config, latent size, batch)
    "demo": (DEMO_UNET, 8, 128),
    "sd-small": (SD_SHAPED_SMALL, 32, 4),
}
MODES = ("train-fp32", "train-bf16", "infer-fp32", "infer-bf16")
ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def call_fn(model: torch.nn.Module, ours: bool) -> Callable[..., torch.Tensor]:
    """``f(x, t, context) -> prediction`` for either model."""
    if ours:
        return model
    return lambda x, t, context: model(x, t, encoder_hidden_states=context).sample


def step_fn(model: torch.nn.Module, ours: bool, mode: str, inputs: tuple[torch.Tensor, ...], device: torch.device,
            adamw: str = "fused"):
    """One call of ``mode``: a training step (MSE to a fixed target, backward, AdamW) or a no-grad forward."""
    forward = call_fn(model, ours)
    x, t, context = inputs
    bf16 = mode.endswith("bf16")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    if mode.startswith("infer"):
        model.eval()

        @torch.no_grad()
        def infer() -> None:
            with autocast():
                forward(x, t, context)

        return infer

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **ADAMW[adamw])
    target = torch.randn_like(x)

    def train() -> None:
        with autocast():
            out = forward(x, t, context)
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return train


def max_output_diff(ours: torch.nn.Module, theirs: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """(max |ours - theirs|, mean |output|) of an fp32 eval forward on (at most 2 of) the inputs."""
    small = tuple(i[:2] for i in inputs)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = call_fn(ours, True)(*small), call_fn(theirs, False)(*small)
    return float((a - b).abs().max()), float(b.abs().mean())


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="model sizes (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per model, per case and mode (default: 10, or 3 for calls over 2 s); 0: none")
    parser.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--adamw", choices=list(ADAMW), default="fused",
                        help="AdamW implementation of both models' training steps (default fused, as LatentDiffusion)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of both models")
    parser.add_argument("--profile-ops", type=int, default=15, help="ops listed per model with --profile (default 15)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 8x8 latents, 1 repeat: a check that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 1 if args.repeats is None else min(args.repeats, 1)
    device = torch.device(args.device)
    print(machine_line())
    print(f"device {device}; AdamW {args.adamw}; median of interleaved calls; ratio = diffusers / ours (> 1: ours faster)")
    header = (f"{'case':10s} {'mode':11s} {'batch':>5s} {'params':>8s} {'ours ms':>10s} {'diffusers ms':>13s} {'ratio':>7s} "
              f"{'calls':>5s}")
    profiles = []
    for case in args.cases:
        config, size, batch = CASES[case]
        batch = args.batch or batch
        size = 8 if args.quick else size
        ours, theirs = build_pair(config)
        ours, theirs = ours.to(device), theirs.to(device)
        inputs = unet_inputs(config, batch, size, device=device)
        diff, scale = max_output_diff(ours, theirs, inputs)
        print(f"\n{case}: {n_params(ours) / 1e6:.2f} M parameters, {size}x{size} latents; fp32 outputs agree to "
              f"max |ours - diffusers| = {diff:.1e} (mean |output| {scale:.2f})")
        print(header)
        for mode in args.modes:
            fns = {"ours": step_fn(ours, True, mode, inputs, device, args.adamw),
                   "diffusers": step_fn(theirs, False, mode, inputs, device, args.adamw)}
            if args.repeats != 0:
                times = interleaved_times(fns, args.repeats, warmup=1 if args.quick else 2, device=device)
                ms = {k: median_ms(v) for k, v in times.items()}
                print(f"{case:10s} {mode:11s} {batch:5d} {n_params(ours) / 1e6:7.2f}M {ms['ours']:10.1f} "
                      f"{ms['diffusers']:13.1f} {ms['diffusers'] / ms['ours']:6.2f}x {len(times['ours']):5d}", flush=True)
            if args.profile:
                calls = 1 if args.quick else 3
                profiles.append((f"{case} {mode}", {name: top_ops(fn, calls, args.profile_ops) for name, fn in fns.items()}))
    for title, columns in profiles:
        print_side_by_side(title, columns)


if __name__ == "__main__":
    main()
