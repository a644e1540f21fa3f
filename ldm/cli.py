"""The ``ldm`` command: ``ldm fit|validate|test|predict`` (LightningCLI), ``ldm data``, ``ldm reconstruct``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Sequence

from ldm.cli_args import finite_float, positive_int

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Models whose every constructor argument `ldm fit --help` documents.
MODEL_CLASSES = ("ldm.models.AutoencoderKL", "ldm.models.LatentDiffusion")
# DataModules `--data` takes (any LightningDataModule does; the first is the default, which a config's plain `data:`
# keys configure) and whose every argument `ldm fit --help` documents.
DATA_CLASSES = ("ldm.data.ImageCaptionDataModule", "ldm.data.StreamingImageCaptionDataModule",
                "ldm.data.PrecomputedLatentsDataModule")


def _lightning_cli(args: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    import ldm.data.datamodule  # noqa: F401  (registers our DataModules as subclass choices)
    import ldm.data.precomputed_datamodule  # noqa: F401
    import ldm.data.streaming  # noqa: F401
    import ldm.models  # noqa: F401  (registers our LightningModules as subclass choices)

    class _CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.set_defaults({"data": {"class_path": DATA_CLASSES[0]}})
            # Always on (issue 12, training faults): checkpoint-and-stop on SIGTERM/SIGUSR1; a failed DDP rank ends the job.
            parser.add_lightning_class_args(ldm.models.PreemptionCheckpoint, "preemption")
            parser.add_lightning_class_args(ldm.models.RankFailureExit, "rank_failure")

        def before_instantiate_classes(self) -> None:
            _no_vae_encoder_for_latents(self.config[self.subcommand] if self.subcommand else self.config)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as exc:  # a model or data argument the classes refuse: a usage error (exit 2)
                _raise_usage_error(exc)

        def instantiate_trainer(self, **kwargs):
            return super().instantiate_trainer(**_with_atomic_checkpoints(self._get(self.config_init, "trainer", default={}), kwargs))

        def before_fit(self) -> None:
            _resolve_last_checkpoint(self.trainer, self.config_init[self.subcommand] if self.subcommand else self.config_init)

    _CLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def _raise_usage_error(exc: Exception) -> None:
    from ldm.cli_errors import UsageError, is_expected, one_line, root_cause

    cause = root_cause(exc)
    if not is_expected(cause):
        raise exc
    name = "" if type(cause) is ValueError else f"{type(cause).__name__}: "
    raise UsageError(f"{name}{one_line(cause)}") from exc


def _with_atomic_checkpoints(trainer_config: dict, kwargs: dict) -> dict:
    """Trainer arguments with :class:`AtomicCheckpointIO` added, unless the config brings its own CheckpointIO."""
    from lightning.pytorch.plugins.io import CheckpointIO

    from ldm.models.checkpoint_io import AtomicCheckpointIO

    plugins = kwargs.get("plugins", trainer_config.get("plugins")) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return {**kwargs, "plugins": plugins}


def _resolve_last_checkpoint(trainer, config) -> None:
    """``--ckpt_path last``: the newest checkpoint that loads in the ModelCheckpoint folders, whatever its name
    (a kill can leave ``last.ckpt`` one save behind ``step=N.ckpt``), after removing half-written ones."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ldm.models.checkpoint_io import newest_valid_checkpoint, remove_stale_temp_files

    folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if trainer.is_global_zero:
        remove_stale_temp_files(folders)
    if config.get("ckpt_path") == "last":
        newest = newest_valid_checkpoint(folders)
        if newest is not None:
            config["ckpt_path"] = str(newest)
            if trainer.is_global_zero:
                print(f"Resuming from {newest} (the newest checkpoint that loads)", file=sys.stderr)


def _no_vae_encoder_for_latents(config) -> None:
    """``LatentDiffusion(vae_encoder=None)`` on precomputed latents: build the VAE without its encoder."""
    model, data = config.get("model"), config.get("data")
    if not model or not data or not str(model.get("class_path", "")).endswith("LatentDiffusion"):
        return
    init_args = model.get("init_args")
    if init_args is not None and init_args.get("vae_encoder") is None:
        init_args["vae_encoder"] = not str(data.get("class_path", "")).endswith("PrecomputedLatentsDataModule")


def _lightning_main(args: list[str]) -> None:
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both argv and args are set
    try:
        if "-h" in args or "--help" in args:
            # Subclass mode only lists `--model CLASS`; print every model's knobs too.
            _run_help(args)
            for class_path in MODEL_CLASSES:
                print(f"\n{'=' * 20} --model {class_path} {'=' * 20}")
                _run_help([args[0], "--model.help", class_path])
            for class_path in DATA_CLASSES:
                print(f"\n{'=' * 20} --data {class_path} {'=' * 20}")
                _run_help([args[0], "--data.help", class_path])
            return
        _lightning_cli(args)
    finally:
        sys.argv = saved_argv


def _run_help(args: list[str]) -> None:
    try:
        _lightning_cli(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def _reconstruct_main(args: list[str]) -> None:
    import torch
    from torch.utils.data import DataLoader

    from ldm.data import ImageCaptionDataModule
    from ldm.evaluation import evaluate_reconstruction
    from ldm.models import AutoencoderKL

    parser = argparse.ArgumentParser(
        prog="ldm reconstruct",
        description="Reconstruct a dataset's validation split with a trained autoencoder; print PSNR, SSIM and rFD_data "
                    "(rFID with --inception-weights) and write a grid.",
    )
    parser.add_argument("--model", required=True, help="folder written by AutoencoderKL.save_pretrained")
    parser.add_argument("--data", default="digits", help="dataset folder or built-in name")
    parser.add_argument("--data-dir", default="data", help="where built-in datasets live")
    parser.add_argument("--image-size", type=positive_int, default=32, help="image size")
    parser.add_argument("--out", default="outputs/reconstructions.png", help="PNG grid to write")
    parser.add_argument("--num-images", type=positive_int, default=16, help="images in the grid")
    parser.add_argument("--inception-weights", default=None,
                        help="FID Inception-v3 weights file: rFID instead of rFD_data (a network trained on the data)")
    parser.add_argument("--feature-cache", default=None,
                        help="folder caching the network trained on the data (default: DATA_DIR/cache/feature-nets)")
    parser.add_argument("--feature-steps", type=positive_int, default=None,
                        help="training steps of that network (default: about 10 epochs, 150-300)")
    parser.add_argument("--no-rfd", action="store_true", help="skip rFD_data/rFID (and training the data's feature network)")
    ns = parser.parse_args(args)

    dm = ImageCaptionDataModule(root=ns.data, data_dir=ns.data_dir, image_size=ns.image_size, batch_size=64)
    dm.prepare_data()
    dm.setup("validate")
    model = AutoencoderKL.from_pretrained(ns.model)
    network = None if ns.no_rfd else _reconstruction_feature_network(ns)
    with torch.inference_mode():
        metrics = evaluate_reconstruction(model.vae, DataLoader(dm.val_dataset, batch_size=64), ns.out, ns.num_images, network)
    rfd = f", {metrics['rfd_label']} {metrics[metrics['rfd_key']]:.4f}" if "rfd_key" in metrics else ""
    print(
        f"{metrics['images']} validation images: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}{rfd}, "
        f"latent scaling factor {float(model.scaling_factor):.4f}"
    )
    if network is not None and network.kind == "data":
        print("rFD_data: Frechet distance between the originals and their reconstructions on a network trained on this "
              "dataset (comparable only with other rFD_data figures on the same data, not with rFID)")
    print(f"Wrote the reconstruction grid (top: originals, bottom: reconstructions) to {ns.out}")


def _reconstruction_feature_network(ns: argparse.Namespace):
    from ldm.evaluation.data_features import DataFeatureSettings
    from ldm.evaluation.eval_data import DEFAULT_FEATURE_CACHE, evaluation_dataset
    from ldm.evaluation.feature_networks import build_feature_network

    if ns.inception_weights is not None:
        return build_feature_network(None, ns.inception_weights)
    cache = ns.feature_cache if ns.feature_cache is not None else str(Path(ns.data_dir) / DEFAULT_FEATURE_CACHE)
    settings = DataFeatureSettings.for_image_size(ns.image_size, steps=ns.feature_steps)
    return build_feature_network(evaluation_dataset(ns.data, ns.data_dir, ns.image_size), cache_dir=cache, settings=settings)


def _add_loading_args(parser: argparse.ArgumentParser) -> None:
    """Options of LatentDiffusionPipeline.from_pretrained and LoRA loading, shared by generate and convert."""
    parser.add_argument("--tokenizer", default=None, help="SD single file: tokenizer folder (such files hold none; default: the hub's); "
                        "SDXL: a folder with tokenizer/ and tokenizer_2/, e.g. a diffusers copy of the model")
    parser.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                        help="override the model's prediction type (SD 2.x 768-v single files: v_prediction)")
    parser.add_argument("--raw-weights", action="store_true", help="the raw weights instead of the EMA ones (.ckpt, SD files)")
    parser.add_argument("--num-heads", type=positive_int, default=None,
                        help="SD single file: UNet attention heads, when not SD's (shapes cannot tell; default: its YAML's, else v1 8)")
    parser.add_argument("--num-head-channels", type=int, default=None,
                        help="SD single file: channels per UNet attention head instead of --num-heads (SD v2: 64)")
    parser.add_argument("--lora", default=None, help="LoRA adapter (.safetensors, or a folder with pytorch_lora_weights.safetensors)")
    parser.add_argument("--lora-scale", type=finite_float(), default=1.0, help="strength of the LoRA adapter")


def _vae_dtype(name: str):
    import torch

    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _load_pipeline(ns: argparse.Namespace, device: str | None = None):
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(ns.model, device=device, use_ema=not ns.raw_weights,
                                                   prediction_type=ns.prediction_type, tokenizer=ns.tokenizer,
                                                   num_heads=ns.num_heads, num_head_channels=ns.num_head_channels,
                                                   vae_dtype=_vae_dtype(getattr(ns, "vae_dtype", "fp32")))
    if ns.lora:
        pipe.load_lora(ns.lora, scale=ns.lora_scale)
    return pipe


def _generate_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ldm generate", description="Generate images from a text prompt (text-to-image, img2img, inpainting).")
    parser.add_argument("prompt", help="the text prompt (\"\" for unconditional)")
    parser.add_argument("--model", required=True, help="ldm or diffusers folder (e.g. checkpoints/demo), LatentDiffusion .ckpt or SD single file")
    _add_loading_args(parser)
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from")
    sdxl = parser.add_argument_group("SDXL models")
    sdxl.add_argument("--prompt-2", default=None, help="prompt for the second text encoder (default: the prompt)")
    sdxl.add_argument("--negative-prompt-2", default=None, help="negative prompt for the second text encoder")
    sdxl.add_argument("--original-size", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                      help="micro-conditioning: the original image size (default: the output size)")
    sdxl.add_argument("--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                      help="micro-conditioning: the crop's top-left corner (default: 0 0)")
    sdxl.add_argument("--target-size", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                      help="micro-conditioning: the target size (default: the output size)")
    _add_sampling_args(parser, steps=25, karras=True)
    parser.add_argument("--vae-dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="the VAE's dtype (fp32 by default; SDXL's original VAE overflows in fp16: a decode that gives "
                             "NaN is redone in fp32, with a warning)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first image (image i gets seed + i); random if omitted")
    parser.add_argument("--num-images", type=positive_int, default=1, help="images to generate")
    parser.add_argument("--height", type=positive_int, default=None, help="image height (default: the model's training size)")
    parser.add_argument("--width", type=positive_int, default=None, help="image width")
    parser.add_argument("--init-image", default=None, help="img2img / inpainting: the starting image")
    parser.add_argument("--strength", type=finite_float(0.0, 1.0, low_open=True), default=None, help="img2img: how much to change the init image, in (0, 1]")
    parser.add_argument("--mask", default=None, help="inpainting: white = repaint, black = keep (same size as --init-image)")
    parser.add_argument("--out", default="outputs", help="output folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ns = parser.parse_args(args)

    import torch
    from PIL import Image

    from ldm.data.images import load_rgb
    from ldm.pipeline.image_io import save_png_with_metadata

    if ns.mask and not ns.init_image:
        parser.error("--mask needs --init-image")
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _load_pipeline(ns, device)
    common = dict(negative_prompt=ns.negative_prompt, num_inference_steps=ns.steps, guidance_scale=ns.guidance, sampler=ns.sampler,
                  num_images_per_prompt=ns.num_images, seed=ns.seed, karras_sigmas=ns.karras)
    sdxl_args = dict(prompt_2=ns.prompt_2, negative_prompt_2=ns.negative_prompt_2, original_size=ns.original_size,
                     crops_coords_top_left=ns.crop_top_left, target_size=ns.target_size)
    common.update({k: tuple(v) if isinstance(v, list) else v for k, v in sdxl_args.items() if v is not None})
    mode = "txt2img"
    if ns.init_image:
        init = load_rgb(ns.init_image)
        if ns.mask:
            mode = "inpaint"
            out = pipe.inpaint(ns.prompt, init, Image.open(ns.mask), strength=1.0 if ns.strength is None else ns.strength, **common)
        else:
            mode = "img2img"
            out = pipe.img2img(ns.prompt, init, strength=0.8 if ns.strength is None else ns.strength, **common)
    else:
        out = pipe(ns.prompt, height=ns.height, width=ns.width, **common)
    for image, seed in zip(out.images, out.seeds):
        meta = {"prompt": ns.prompt, "negative_prompt": ns.negative_prompt or "", "seed": seed, "steps": ns.steps,
                "sampler": ns.sampler + (" karras" if ns.karras else ""), "guidance": ns.guidance, "mode": mode,
                "size": f"{image.width}x{image.height}", "model": ns.model}
        if mode != "txt2img":
            meta["strength"] = ns.strength if ns.strength is not None else (1.0 if mode == "inpaint" else 0.8)
        path = save_png_with_metadata(image, Path(ns.out) / f"{_slug(ns.prompt)}-{seed}.png", meta)
        print(path)


def _slug(text: str) -> str:
    import re

    return (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unconditional")[:60]


def _convert_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ldm convert", description="Convert a text-to-image model between formats.")
    parser.add_argument("model", metavar="src", help="ldm folder, diffusers folder, LatentDiffusion .ckpt or SD single file")
    parser.add_argument("dst", help="output folder (ldm, diffusers) or .safetensors file (sd)")
    parser.add_argument("--to", required=True, choices=["ldm", "diffusers", "sd"], help="output format")
    _add_loading_args(parser)
    ns = parser.parse_args(args)

    pipe = _load_pipeline(ns)
    pipe.merge_lora()  # --lora, or a LoRA fine-tune's .ckpt: written merged, a plain model every tool loads
    print(f"Wrote {pipe.save_pretrained(ns.dst, format=ns.to)} ({ns.to})")


def _add_sampling_args(parser: argparse.ArgumentParser, steps: int = 20, karras: bool = False) -> None:
    from ldm.diffusion.sampler_registry import KARRAS_SAMPLERS, SAMPLER_REGISTRY

    parser.add_argument("--steps", type=positive_int, default=steps, help="sampler steps")
    parser.add_argument("--guidance", type=finite_float(), default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLER_REGISTRY), help="sampler (default: dpmpp_2m)")
    if karras:
        parser.add_argument("--karras", action="store_true", help=f"Karras sigmas ({', '.join(KARRAS_SAMPLERS)})")


def _evaluate_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ldm evaluate", description="Evaluate an exported text-to-image model.")
    sub = parser.add_subparsers(dest="task", required=True)
    digits = sub.add_parser("digits", help="prompt accuracy on 'a handwritten digit N' with a classifier trained on real digits")
    digits.add_argument("--model", required=True, help="exported model folder (e.g. checkpoints/demo)")
    _add_loading_args(digits)
    _add_sampling_args(digits)
    digits.add_argument("--per-digit", type=positive_int, default=10, help="samples per digit")
    digits.add_argument("--seed", type=int, default=0, help="first seed")
    digits.add_argument("--out", default="outputs/demo_samples.png", help="PNG grid: one row per digit 0..9")
    mirrored = sub.add_parser("mirrored", help="'a mirrored digit N' vs 'a handwritten digit N' judged by digit and orientation")
    mirrored.add_argument("--model", required=True, help="exported model folder (e.g. checkpoints/demo)")
    _add_loading_args(mirrored)
    _add_sampling_args(mirrored)
    mirrored.add_argument("--per-digit", type=positive_int, default=20, help="samples per prompt (digits 2-7, 9; mirrored and normal): 20 moves a digit's figure by 5 points per sample")
    mirrored.add_argument("--seed", type=int, default=0, help="first seed (shared by the mirrored and normal prompt of a digit)")
    mirrored.add_argument("--batch-size", type=positive_int, default=100, help="images per pipeline call")
    mirrored.add_argument("--grid", default="outputs/mirrored_samples.png", help="PNG grid: mirrored prompts' rows, then normal")
    _add_quality_parser(sub)
    ns = parser.parse_args(args)

    device = None
    if ns.task == "quality":
        import torch

        device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _load_pipeline(ns, device)
    if ns.task == "quality":
        _evaluate_quality(ns, pipe)
        return
    if ns.task == "mirrored":
        import json

        from ldm.evaluation.mirrored_digits import evaluate_mirrored_prompts

        result = evaluate_mirrored_prompts(pipe, ns.steps, ns.guidance, ns.sampler, ns.per_digit, ns.seed, ns.grid, ns.batch_size)
        adapter = f"LoRA {ns.lora} x{ns.lora_scale}" if ns.lora else "no LoRA"
        print(f"{ns.model} ({adapter}; {ns.sampler}, {ns.steps} steps, guidance {ns.guidance}), {result['samples']} samples:")
        for kind in ("mirrored", "normal"):
            print(
                f"  {kind:8s} prompts: {100 * result[kind + '_accuracy']:.1f}% right digit and orientation "
                f"(right digit {100 * result['right_digit'][kind + '_prompts']:.1f}%, "
                f"judged mirrored {100 * result['judged_mirrored'][kind + '_prompts']:.1f}%); per digit: "
                + " ".join(f"{d}:{100 * a:.0f}%" for d, a in zip(result["digits"], result["per_digit"][kind]))
            )
        print(f"judge accuracy on held-out real digits and mirror images: {100 * result['judge_accuracy']:.1f}%")
        print(f"Wrote the sample grid (rows: 'a mirrored digit d', then 'a handwritten digit d') to {ns.grid}")
        print(json.dumps({"model": ns.model, "lora": ns.lora, "lora_scale": ns.lora_scale if ns.lora else None, **result}))
        return

    from ldm.evaluation.digit_accuracy import evaluate_digit_prompts

    result = evaluate_digit_prompts(pipe, ns.steps, ns.guidance, ns.sampler, ns.per_digit, ns.seed, ns.out)
    print(
        f"prompt accuracy {100 * result['accuracy']:.1f}% over {result['samples']} samples "
        f"({ns.sampler}, {ns.steps} steps, guidance {ns.guidance}); per digit: "
        + " ".join(f"{d}:{100 * a:.0f}%" for d, a in enumerate(result["per_digit"]))
    )
    if "fd_digits" in result:
        print(
            f"fidelity FD_digits {result['fd_digits']:.2f} (real-vs-real floor at this size "
            f"{result['fd_floor']:.2f} +- {result['fd_floor_std']:.2f}; lower is closer to the real digits; not FID); "
            f"diversity {result['diversity']:.2f} of the real digits' spread; per digit: "
            + " ".join(f"{d}:{r:.2f}" for d, r in result["diversity_per_digit"].items())
        )
    print(f"classifier accuracy on held-out real digits: {100 * result['classifier_accuracy']:.1f}%")
    print(f"Wrote the sample grid (row d: 'a handwritten digit d') to {ns.out}")


def _add_quality_parser(sub) -> None:
    quality = sub.add_parser("quality", help="FD/KID on a network trained on the data (FID/KID/IS with --inception-weights) "
                             "and CLIP score, of samples drawn from a dataset's captions, against its real images")
    quality.add_argument("--model", required=True, help="the model (any layout ldm generate loads)")
    _add_loading_args(quality)
    quality.add_argument("--data", required=True, help="dataset folder or built-in name: its captions prompt, its images compare")
    quality.add_argument("--data-dir", default="data", help="where built-in datasets live")
    _add_sampling_args(quality)
    quality.add_argument("--num-samples", type=positive_int, default=200, help="samples, and real images they are compared with")
    quality.add_argument("--seed", type=int, default=0, help="seed of the real-image choice; sample i gets seed + i")
    quality.add_argument("--batch-size", type=positive_int, default=50, help="images per pipeline call")
    quality.add_argument("--image-size", type=positive_int, default=None, help="sample and real image size (default: the model's)")
    quality.add_argument("--inception-weights", default=None,
                         help="FID Inception-v3 weights file (pt_inception-2015-12-05-6726825d.pth): figures become FID/KID/IS")
    quality.add_argument("--clip-model", default=None, help="CLIPModel folder or hub name for the CLIP score")
    quality.add_argument("--feature-cache", default=None,
                         help="folder caching the network trained on the data (default: DATA_DIR/cache/feature-nets)")
    quality.add_argument("--feature-steps", type=positive_int, default=None,
                         help="training steps of that network (default: about 10 epochs, 150-300)")
    quality.add_argument("--json", default=None, help="write the figures (and prompts) to this JSON file")
    quality.add_argument("--grid", default=None, help="PNG grid: up to 32 samples, then the real images of their captions")
    quality.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _evaluate_quality(ns: argparse.Namespace, pipe) -> None:
    import json

    from ldm.evaluation.quality import evaluate_model_quality, format_quality_table

    result = evaluate_model_quality(pipe, ns.data, ns.data_dir, ns.num_samples, ns.steps, ns.guidance, ns.sampler, ns.seed,
                                    ns.batch_size, ns.image_size, ns.inception_weights, ns.clip_model, ns.feature_cache, ns.grid,
                                    ns.feature_steps)
    result = {"model": ns.model, "lora": ns.lora, **result}
    print(f"{ns.model} on {result['data']} ({result['dataset_images']} images): {ns.num_samples} samples "
          f"({ns.sampler}, {ns.steps} steps, guidance {ns.guidance}, seed {ns.seed}, {result['image_size']} px)")
    print(format_quality_table(result))
    if ns.grid:
        print(f"Wrote the grid (samples, then the real images of their captions) to {ns.grid}")
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(result, indent=1))
        print(f"Wrote {ns.json}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ldm`` console script (``--debug`` anywhere: tracebacks instead of one-line errors)."""
    from ldm.threads import apply_thread_policy

    apply_thread_policy()  # before anything imports torch
    from ldm.cli_errors import pop_debug, run_reporting_errors

    args = list(sys.argv[1:] if argv is None else argv)
    debug = pop_debug(args)
    command = args[0] if args else ""
    run_reporting_errors(command, lambda: _dispatch(args), debug)


def _dispatch(args: list[str]) -> None:
    if args and args[0] == "data":
        from ldm.cli_data import data_main

        data_main(args[1:])
    elif args and args[0] == "generate":
        _generate_main(args[1:])
    elif args and args[0] == "convert":
        _convert_main(args[1:])
    elif args and args[0] == "evaluate":
        _evaluate_main(args[1:])
    elif args and args[0] == "reconstruct":
        _reconstruct_main(args[1:])
    elif args and args[0] in LIGHTNING_SUBCOMMANDS:
        _lightning_main(args)
    else:
        print(
            "usage: ldm {fit,validate,test,predict} --config CONFIG [...]   train/evaluate (LightningCLI; --help lists every knob)\n"
            "       ldm data prepare {digits,mirrored_digits,shapes} --out DIR  write a bundled dataset\n"
            "       ldm data tokenizer ROOT --out DIR                      train a CLIP-style tokenizer on captions\n"
            "       ldm data encode SRC --vae MODEL --out DIR              precompute VAE latents (+ text embeddings)\n"
            "       ldm reconstruct --model DIR [--data digits]            autoencoder PSNR/SSIM/rFD + grid\n"
            "       ldm generate PROMPT --model DIR [--steps 25 --seed 0]  text-to-image (img2img/inpainting: --init-image, --mask)\n"
            "       ldm convert SRC DST --to ldm|diffusers|sd              convert between model formats\n"
            "       ldm evaluate digits --model DIR [--steps 20]           prompt accuracy of the digits demo\n"
            "       ldm evaluate mirrored --model DIR [--lora FILE]        'a mirrored digit N': digit + orientation accuracy\n"
            "       ldm evaluate quality --model DIR --data DATA           FD/KID (FID/KID/IS, CLIP score) of samples vs the data\n"
            "       --debug (any command)                                  show tracebacks instead of one-line errors",
            file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout,
        )
        if args and args[0] not in ("-h", "--help"):
            raise SystemExit(2)

if __name__ == "__main__":
    main()
