"""Whole text-to-image generation, ours vs diffusers: ``LatentDiffusionPipeline`` vs ``StableDiffusionPipeline``
on the same weights, DPM-Solver++(2M), classifier-free guidance, the same seeds and steps.

Each model is saved once as a diffusers folder (our writer) and both pipelines load that folder, so the weights are
the same; diffusers' scheduler is set to the DPM-Solver++(2M) that our ``dpmpp_2m`` equals (midpoint, first-order
last step into sigma 0; tests/formats/test_generation_parity.py) and each image's noise comes from its own seed in
both. The images are compared first (max |ours - diffusers| in [0, 1]), so both compute the same thing; then the
two pipelines generate in turn (ours, theirs, ours, ...) in one process, and the script prints the median seconds
per image and the ratio diffusers/ours (> 1: ours is faster). Prompt encoding, sampling and VAE decoding are timed.

Models (random weights unless named):
  demo-shaped  configs/diffusion/digits.yaml's UNet, the digits VAE (f=4) and text encoder (64 wide), 32x32 images
  sd-small     SD v1.x's UNet layout at 1/5 width (64 channels, context 768), an SD-layout VAE at 1/4 width (f=8),
               a 2-layer 768-wide CLIP text model, 256x256 images (32x32 latents)
  demo         the trained demo model at --demo (default checkpoints/demo), when that folder exists

    .venv/bin/python benchmarks/generation.py                 # the figures
    .venv/bin/python benchmarks/generation.py --quick         # a check that the script runs (figures mean nothing)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is run
from bench_common import machine_line, parser_from_doc  # noqa: E402
from unet_pair import DEMO_UNET, SD_SHAPED_SMALL, randomize_  # noqa: E402

from ldm.diffusion import NoiseSchedule, SamplerConfig  # noqa: E402
from ldm.nn.configs import AutoencoderConfig, TextEncoderConfig, UNetConfig  # noqa: E402

PROMPTS = ["a handwritten digit 3", "a red circle above a blue square"]
# name: (UNet, VAE, text encoder, image size)
RANDOM_MODELS = {
    "demo-shaped": (DEMO_UNET, AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32),
                    TextEncoderConfig(hidden_size=64, num_layers=2, num_heads=2), 32),
    "sd-small": (SD_SHAPED_SMALL, AutoencoderConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, resolution=256),
                 TextEncoderConfig(hidden_size=768, num_layers=2, num_heads=12), 256),
}
# diffusers' DPMSolverMultistepScheduler settings that equal our dpmpp_2m.
DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
                lower_order_final=True)


def random_model_folder(name: str, root: Path) -> Path:
    """A random-weight model written as a diffusers folder by our writer (the source both pipelines load)."""
    from ldm.data.tokenizer import train_clip_tokenizer
    from ldm.formats.text_encoder_files import new_text_encoder
    from ldm.nn.autoencoder import KLAutoencoder
    from ldm.nn.unet import UNetModel
    from ldm.pipeline import LatentDiffusionPipeline

    unet_config, vae_config, text_config, size = RANDOM_MODELS[name]
    torch.manual_seed(0)
    captions = [f"a handwritten digit {d}" for d in range(10)] + ["a red circle above a blue square", "a green triangle"]
    tokenizer = train_clip_tokenizer(captions * 3, root / "tokenizer", vocab_size=600)
    text = new_text_encoder(tokenizer, text_config).eval()
    unet = randomize_(UNetModel(unet_config.replace(context_dim=text.hidden_size)), seed=1)
    vae = KLAutoencoder(vae_config)
    pipe = LatentDiffusionPipeline(unet, vae, text, NoiseSchedule(), "epsilon", scaling_factor=1.0, sample_size=size,
                                   sampler_config=SamplerConfig(steps_offset=1))  # SD's timesteps
    return pipe.save_pretrained(root / name, format="diffusers")


def load_both(folder: Path):
    """(ours, diffusers') pipelines on the diffusers folder, diffusers' scheduler set to our dpmpp_2m with our
    timestep layout (StableDiffusionPipeline forces ``steps_offset=1`` at construction; this undoes that where the
    model's own offset differs)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ldm.pipeline import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    layout = dict(timestep_spacing=ours.sampler_config.timestep_spacing, steps_offset=ours.sampler_config.steps_offset)
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config, **DPMPP_2M, **layout)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def main() -> None:
    parser = parser_from_doc(__doc__)
    parser.add_argument("--models", nargs="+", choices=[*RANDOM_MODELS, "demo"], default=[*RANDOM_MODELS, "demo"],
                        help="what to run (default: all; demo only where --demo exists)")
    parser.add_argument("--demo", default="checkpoints/demo", help="the trained demo model folder (default checkpoints/demo)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default 5)")
    parser.add_argument("--images", type=int, default=1, help="images per call (prompts cycled; default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per pipeline and model (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (image i: seed + i)")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 repeat, small images: a check that the script runs")
    args = parser.parse_args()
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # no progress bars or config warnings between the rows
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # StableDiffusionPipeline's steps_offset notice
    sizes = {"demo-shaped": 32, "sd-small": 256, "demo": None}
    if args.quick:
        args.steps, args.repeats, sizes["sd-small"] = 2, 1, 64
    print(machine_line())
    print(f"DPM-Solver++(2M), {args.steps} steps, guidance {args.guidance}, {args.images} image(s) per call, "
          f"median of {args.repeats} interleaved calls; ratio = diffusers / ours (> 1: ours faster)")
    print(f"{'model':12s} {'size':>7s} {'max |diff|':>10s} {'ours s/img':>11s} {'diffusers s/img':>16s} {'ratio':>7s}")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "demo":
                if not (Path(args.demo) / "model_index.json").exists():
                    print(f"{name:12s} skipped: no model at {args.demo}")
                    continue
                from ldm.pipeline import LatentDiffusionPipeline

                folder = LatentDiffusionPipeline.from_pretrained(args.demo).save_pretrained(Path(tmp) / "demo", format="diffusers")
            else:
                folder = random_model_folder(name, Path(tmp))
            ours, theirs = load_both(folder)
            size = sizes[name] or ours.sample_size
            def run_ours() -> np.ndarray:
                return ours(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler="dpmpp_2m",
                            seed=args.seed, height=size, width=size, output_type="np", progress=False).images

            def run_theirs() -> np.ndarray:
                gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
                with torch.no_grad():
                    return theirs(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                                  height=size, width=size, output_type="np").images

            diff = float(np.abs(run_ours() - run_theirs()).max())  # also the warm-up call
            times: dict[str, list[float]] = {"ours": [], "diffusers": []}
            for _ in range(args.repeats):
                for key, fn in (("ours", run_ours), ("diffusers", run_theirs)):
                    start = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - start) / len(prompts))
            s = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name:12s} {f'{size}px':>7s} {diff:10.1e} {s['ours']:11.3f} {s['diffusers']:16.3f} "
                  f"{s['diffusers'] / s['ours']:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
