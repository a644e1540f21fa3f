"""GPU throughput of an SD 1.5-shaped UNet (ours, random weights): training images/s and MFU, generation it/s.

Runs only where CUDA is available (elsewhere it prints "skipped: no CUDA GPU" and exits 0). One command, meant to
finish in about 6 minutes on an H100/H200 (compilation included):

  training    SD 1.5's UNet (320 channels, mult [1, 2, 4, 4], 2 res blocks, attention [4, 2, 1], 8 heads, context
              768; 860 M parameters) on precomputed latents and text embeddings (random): forward + backward +
              fused AdamW under bf16 autocast (fp32 weights), at 256x256 (32x32 latents, batch 64; 128 on a GPU
              with over 100 GiB) and 512x512 (64x64 latents, batch 16; 32), eager / channels_last /
              torch.compile + channels_last (our ``compile_in_place`` and ``to_channels_last``, what
              ``--model.compile`` and ``--model.channels_last`` do). A batch that does not fit is halved until it does.
  MFU         FLOPs of one step (torch.utils.flop_counter.FlopCounterMode on the meta device: matmuls,
              convolutions, attention) / step time / the GPU's dense bf16 peak (a table by device name;
              ``--peak-tflops`` overrides).
  generation  DPM-Solver++(2M) at 512x512, 20 steps, classifier-free guidance (UNet batch 2), fp16 weights: it/s
              (sampler steps per second, the UNet forwards and the sampler's own arithmetic), eager SDPA and
              torch.compile + channels_last (``--gen-modes`` adds "reduce-overhead + channels_last": CUDA graphs).
A compiled variant starts only while 2 minutes of ``--max-minutes`` (default 7) are left, so the run stays short.

The published anchors are printed next to the figures, with the MFU they imply for this UNet's FLOPs:
MosaicML trained SD2-base's UNet (nearly the same FLOPs) at ~137 img/s per A100 at 256 px with precomputed
latents; diffusers runs SD 1.5 at 512 px at ~31 it/s on an A100 (SDPA, fp16) and ~47 it/s compiled + channels_last.

    .venv/bin/python benchmarks/gpu.py                        # the figures (on a CUDA machine)
    .venv/bin/python benchmarks/gpu.py --device cpu --quick   # a check that the code runs (tiny UNet; no figures)
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is run
from bench_common import machine_line, parser_from_doc, synchronize  # noqa: E402

from ldm.nn.configs import UNetConfig  # noqa: E402

SD15 = UNetConfig()  # the defaults are SD v1.x's UNet
TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, attention_resolutions=(4, 2, 1),
                  num_heads=4, context_dim=64)  # --quick: the same layout, tiny
# Dense bf16/fp16 tensor-core peak FLOP/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_FLOPS = [("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
              ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12)]
A100_PEAK = 312e12
MOSAIC_IMG_S_A100 = 137.0  # SD2-base UNet training, 256 px, precomputed latents, per A100
DIFFUSERS_IT_S_A100 = {"eager": 31.0, "compile + channels_last": 47.0}  # SD 1.5, 512 px, fp16, CFG batch 2
TRAIN_VARIANTS = {"eager": (False, False), "channels_last": (True, False), "compile + channels_last": (True, True)}
COMPILE_S = 120  # about what compiling one variant of this UNet takes on an H100 (training: forward and backward)
GEN_MODES = {"eager": None, "compile + channels_last": "default", "reduce-overhead + channels_last": "reduce-overhead"}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


@dataclass
class Result:
    batch: int
    seconds: float  # per step (training) or per sampler run (generation)
    peak_gb: float


def new_unet(config: UNetConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    from ldm.nn.unet import UNetModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNetModel(config)
        for p in unet.parameters():  # random weights (the zero-initialised output layers too)
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=0.02)
    return unet.to(dtype)


def count_flops(config: UNetConfig, size: int, batch: int, backward: bool) -> int:
    """FLOPs of one UNet call (``backward``: forward + backward) on ``batch`` latents of ``size``, counted by
    FlopCounterMode on the meta device (no memory, no GPU time; the count does not depend on dtype or layout)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = new_unet(config, torch.device("meta"))
    with torch.device("meta"):
        x, t = torch.randn(batch, config.in_channels, size, size), torch.zeros(batch, dtype=torch.long)
        context = torch.randn(batch, 77, config.context_dim)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = unet(x, t, context)
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def train_run(config: UNetConfig, size: int, batch: int, channels_last: bool, compile_: bool, args, device) -> Result:
    """Seconds per step of one training variant (after ``args.warmup`` untimed steps, which compile)."""
    from ldm.nn.speedups import channels_last_input, compile_in_place, to_channels_last

    unet = new_unet(config, device).train()
    if channels_last:
        to_channels_last(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, config.in_channels, size, size, device=device, generator=g)
    x = channels_last_input(x) if channels_last else x
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    context = torch.randn(batch, 77, config.context_dim, device=device, generator=g)
    target = torch.randn(x.shape, device=device, generator=g)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(x, t, context)
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if compile_:
        torch._dynamo.reset()
        compile_in_place(unet, "default", backend=args.compile_backend)
    for _ in range(args.warmup):  # compilation happens here
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return Result(batch, (time.perf_counter() - start) / args.steps, peak_gb(device))


def train_fitting(config, size, batch, channels_last, compile_, args, device) -> Result:
    """:func:`train_run`, halving the batch after an out-of-memory error."""
    while True:
        try:
            return train_run(config, size, batch, channels_last, compile_, args, device)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"  (batch {batch} does not fit at {size * 8}px; trying {batch // 2})", flush=True)
            batch //= 2
        finally:
            free(device)


def generation_run(config: UNetConfig, size: int, mode: str | None, args, device) -> Result:
    """Seconds per DPM-Solver++(2M) run of ``args.gen_steps`` steps with CFG (after one untimed run, which compiles)."""
    from ldm.diffusion import NoiseSchedule, sample
    from ldm.diffusion.guided import guided_denoiser
    from ldm.nn.speedups import CudaGraphSteps, compile_in_place, to_channels_last, uses_cuda_graphs

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = new_unet(config, device, dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    context = torch.randn(1, 77, config.context_dim, device=device, dtype=dtype, generator=g)
    uncond = torch.randn(1, 77, config.context_dim, device=device, dtype=dtype, generator=g)
    noise = torch.randn(1, config.in_channels, size, size, device=device, generator=g)
    schedule = NoiseSchedule()
    if mode is not None:
        torch._dynamo.reset()
        compile_in_place(to_channels_last(unet), mode, backend=args.compile_backend)
    model = CudaGraphSteps(unet) if uses_cuda_graphs(mode) else unet

    @torch.no_grad()
    def run() -> None:
        sample("dpmpp_2m", guided_denoiser(model, context, uncond, 7.5), noise, schedule, args.gen_steps)

    run()  # warm-up (compiles)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.gen_repeats):
        run()
    synchronize(device)
    return Result(2, (time.perf_counter() - start) / args.gen_repeats, peak_gb(device))


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only with --quick, to check the code")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny UNet, tiny latents, 2 steps, compile backend aot_eager: checks the code runs")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="training image sizes (px)")
    parser.add_argument("--batch-256", type=int, default=None,
                        help="training batch at 256 px (default 64, or 128 on a GPU with over 100 GiB)")
    parser.add_argument("--batch-512", type=int, default=None,
                        help="training batch at 512 px (default 16, or 32 on a GPU with over 100 GiB)")
    parser.add_argument("--variants", nargs="+", choices=list(TRAIN_VARIANTS), default=list(TRAIN_VARIANTS),
                        help="training variants (default: all)")
    parser.add_argument("--gen-modes", nargs="*", choices=list(GEN_MODES), default=["eager", "compile + channels_last"],
                        help="generation variants (default: eager and compile + channels_last; none: skip generation)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default 3)")
    parser.add_argument("--gen-steps", type=int, default=20, help="sampler steps per generation (default 20)")
    parser.add_argument("--gen-repeats", type=int, default=3, help="timed generations per variant (default 3)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, overriding the table")
    parser.add_argument("--max-minutes", type=float, default=7.0,
                        help="start a compiled variant only while 2 minutes of this budget are left (default 7)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA GPU (torch.cuda.is_available() is False)")
        return
    if device.type == "cpu" and not args.quick:
        parser.error("--device cpu only checks the code: add --quick")
    config = SD15
    sizes = {res: res // 8 for res in args.resolutions}
    big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory > 100 * 2**30
    batches = {256: args.batch_256 or (128 if big else 64), 512: args.batch_512 or (32 if big else 16)}
    if args.quick:
        config, args.steps, args.warmup, args.gen_steps, args.gen_repeats = TINY, 2, 1, 2, 1
        sizes = {res: 8 * (i + 1) for i, res in enumerate(args.resolutions)}
        batches = {res: 2 for res in args.resolutions}
        if args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions (in the warm-up)
    peak = peak_flops(device, args.peak_tflops)
    began = time.perf_counter()
    print(machine_line())
    n_params = sum(p.numel() for p in new_unet(config, torch.device("meta")).parameters())
    print(f"UNet {'SD 1.5' if config is SD15 else 'tiny (--quick)'}: {n_params / 1e6:.0f} M parameters; peak "
          f"{'unknown (give --peak-tflops)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; "
          f"compile backend {args.compile_backend}")

    print(f"\ntraining (bf16 autocast, fused AdamW, precomputed latents; {args.steps} timed steps after {args.warmup})")
    print(f"{'size':>6s} {'variant':26s} {'batch':>5s} {'ms/step':>9s} {'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GB':>8s}")
    for res in args.resolutions:
        size = sizes[res]
        flops_per_image = count_flops(config, size, 1, backward=True)
        for variant in args.variants:
            channels_last, compile_ = TRAIN_VARIANTS[variant]
            if compile_ and time.perf_counter() - began > args.max_minutes * 60 - COMPILE_S:
                print(f"{res:5d}px {variant:26s} skipped: past --max-minutes {args.max_minutes}")
                continue
            result = train_fitting(config, size, batches.get(res, 16), channels_last, compile_, args, device)
            achieved = flops_per_image * result.batch / result.seconds
            mfu = f"{100 * achieved / peak:5.1f}%" if peak else "  n/a"
            print(f"{res:5d}px {variant:26s} {result.batch:5d} {1000 * result.seconds:9.1f} {result.batch / result.seconds:8.1f} "
                  f"{achieved / 1e12:8.1f} {mfu:>6s} {result.peak_gb:8.1f}", flush=True)
        if res == 256 and not args.quick:
            implied = MOSAIC_IMG_S_A100 * flops_per_image / A100_PEAK
            print(f"  anchor: MosaicML ~{MOSAIC_IMG_S_A100:.0f} img/s per A100 at 256 px (SD2-base UNet, precomputed latents)"
                  f" = ~{100 * implied:.0f}% MFU with this UNet's {flops_per_image / 1e9:.0f} GFLOP per image")

    if args.gen_modes:
        res = 512
        size = 64 if not args.quick else 8
        print(f"\ngeneration ({res}x{res}, DPM-Solver++(2M) {args.gen_steps} steps, CFG: UNet batch 2, "
              f"{'fp16' if device.type == 'cuda' else 'fp32'} weights; {args.gen_repeats} timed runs)")
        print(f"{'variant':34s} {'s/image':>8s} {'it/s':>7s} {'MFU':>6s} {'peak GB':>8s}")
        call_flops = count_flops(config, size, 2, backward=False)
        for name in args.gen_modes:
            mode = GEN_MODES[name]
            if mode is not None and time.perf_counter() - began > args.max_minutes * 60 - COMPILE_S:
                print(f"{name:34s} skipped: past --max-minutes {args.max_minutes}")
                continue
            result = generation_run(config, size, mode, args, device)
            free(device)
            its = args.gen_steps / result.seconds
            mfu = f"{100 * call_flops * its / peak:5.1f}%" if peak else "  n/a"
            print(f"{name:34s} {result.seconds:8.2f} {its:7.1f} {mfu:>6s} {result.peak_gb:8.1f}", flush=True)
        for name, its in DIFFUSERS_IT_S_A100.items() if not args.quick else ():
            implied = 100 * call_flops * its / A100_PEAK
            print(f"  anchor: diffusers SD 1.5 512 px on an A100, {name}: ~{its:.0f} it/s = ~{implied:.0f}% MFU with this "
                  f"UNet's {call_flops / 1e9:.0f} GFLOP per CFG call")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
