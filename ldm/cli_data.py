"""``ldm data prepare|tokenizer|encode|optimize|dreambooth``: the dataset subcommands of the ``ldm`` command (ldm/cli.py)."""

from __future__ import annotations

import argparse

from ldm.cli_args import finite_float, non_negative_int, positive_int


def data_main(args: list[str]) -> None:
    """``ldm data ARGS``: parse and run one data subcommand."""
    from ldm.data import BUILTIN_DATASETS, prepare_builtin

    parser = argparse.ArgumentParser(prog="ldm data", description="Prepare the bundled datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write a built-in dataset as images + metadata.jsonl")
    prep.add_argument("name", choices=sorted(BUILTIN_DATASETS), help="built-in dataset")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--image-size", type=positive_int, default=None, help="image size in pixels (shapes: 32 or 64)")
    prep.add_argument("--num-images", type=positive_int, default=None, help="number of images (shapes only)")
    prep.add_argument("--seed", type=int, default=None, help="random seed (shapes only)")
    tok = sub.add_parser("tokenizer", help="train a small CLIP-style BPE tokenizer on a dataset's captions")
    tok.add_argument("root", help="dataset folder or built-in name")
    tok.add_argument("--out", required=True, help="output folder (loadable with CLIPTokenizer.from_pretrained)")
    tok.add_argument("--data-dir", default="data", help="where built-in datasets live")
    tok.add_argument("--vocab-size", type=positive_int, default=1000, help="largest vocabulary to learn")
    _add_encode_parser(sub)
    opt = sub.add_parser("optimize", help="write a dataset (folder or built-in) as litdata shards for streaming")
    opt.add_argument("root", help="dataset folder or built-in name (anything --data.root accepts)")
    opt.add_argument("--out", required=True, help="output directory (train/ and val/ litdata directories)")
    opt.add_argument("--data-dir", default="data", help="where built-in datasets live")
    opt.add_argument("--workers", type=positive_int, default=1, help="parallel worker processes")
    opt.add_argument("--resize", type=positive_int, default=None, help="re-encode with the shorter side at most this many pixels")
    opt.add_argument("--chunk-bytes", default="64MB", help="target chunk size")
    opt.add_argument("--val-fraction", type=finite_float(0.0, 1.0), default=0.1, help="validation share, as --data.val_fraction")
    for command in (tok, opt):
        _add_folder_rules(command)
    _add_dreambooth_parser(sub)
    ns = parser.parse_args(args)
    if ns.command == "dreambooth":
        _dreambooth_main(ns)
        return
    if ns.command == "optimize":
        from ldm.data.shards import optimize_dataset

        summary = optimize_dataset(ns.root, ns.out, workers=ns.workers, resize=ns.resize, chunk_bytes=ns.chunk_bytes,
                                   data_dir=ns.data_dir, val_fraction=ns.val_fraction, progress=True, **_folder_rules(ns))
        print(f"Wrote {summary['splits']['train']} training and {summary['splits']['val']} validation images to {ns.out} "
              f"({len(summary['skipped'])} unreadable skipped)")
        return
    if ns.command == "encode":
        _encode_main(ns)
        return
    if ns.command == "tokenizer":
        from ldm.data import ImageCaptionDataModule
        from ldm.data.tokenizer import train_clip_tokenizer

        dm = ImageCaptionDataModule(root=ns.root, data_dir=ns.data_dir, **_folder_rules(ns))
        dm.prepare_data()
        dm.setup("fit")
        captions = [c for ds in (dm.train_dataset, dm.val_dataset) for r in ds.records for c in r.captions]
        path = train_clip_tokenizer(captions, ns.out, vocab_size=ns.vocab_size)
        print(f"Trained a tokenizer on {len(captions)} captions; wrote {path}")
        return
    options = {k: v for k, v in {"image_size": ns.image_size, "num_images": ns.num_images, "seed": ns.seed}.items() if v is not None}
    path = prepare_builtin(ns.name, ns.out, **options)
    print(f"Prepared {ns.name} in {path}")


def _add_encode_parser(sub) -> None:
    enc = sub.add_parser(
        "encode", help="encode a dataset once with a frozen VAE (and text encoder) into precomputed latents (litdata)",
        description="Write the VAE posterior moments of every training and validation image (centre crop, no flip: what "
                    "training sees), their captions and split, and optionally the text embeddings of every distinct "
                    "caption, as litdata chunks under --out, with --out/ldm_latents.json. Rerun the same command to "
                    "resume an interrupted encode. Train with: ldm fit ... --data ldm.data.PrecomputedLatentsDataModule "
                    "--data.root OUT")
    enc.add_argument("src", help="dataset folder or built-in name (anything --data.root accepts)")
    enc.add_argument("--vae", required=True, metavar="MODEL",
                     help="VAE folder (AutoencoderKL.save_pretrained, e.g. checkpoints/digits-vae), or a model "
                          "(ldm export, diffusers folder, LatentDiffusion .ckpt, SD single file): its VAE")
    enc.add_argument("--out", required=True, help="output folder")
    enc.add_argument("--text-encoder", default=None, metavar="MODEL_OR_FOLDER",
                     help="also write frozen text-encoder embeddings: a CLIP text encoder folder or hub id, a model folder "
                          "with text_encoder/ and tokenizer/, or 'same' for the text encoder of the --vae model")
    enc.add_argument("--text-encoder-layer", default=None, choices=["last", "penultimate"],
                     help="hidden layer used as context (default: the one recorded with the text encoder)")
    enc.add_argument("--image-size", type=positive_int, default=None, help="training image size (default: the VAE's training size)")
    enc.add_argument("--batch-size", type=positive_int, default=32, help="images (captions) per encoder call")
    enc.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    enc.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                     help="storage of moments and embeddings (float16: half the size; read back as float32)")
    enc.add_argument("--chunk-bytes", default="64MB", help="target litdata chunk size")
    enc.add_argument("--part-size", type=positive_int, default=4096, help="images per resumable part")
    enc.add_argument("--data-dir", default="data", help="where built-in datasets live")
    enc.add_argument("--val-fraction", type=finite_float(0.0, 1.0), default=0.1, help="validation share, as --data.val_fraction")
    enc.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader processes decoding images")
    enc.add_argument("--buckets", action="store_true", help="aspect-ratio buckets: each image's latents at its bucket size")
    enc.add_argument("--bucket-multiple", type=positive_int, default=64, help="bucket sides are multiples of this (as --data.bucket_multiple)")
    enc.add_argument("--bucket-max-ratio", type=finite_float(1.0), default=2.0, help="widest bucket aspect ratio (as --data.bucket_max_ratio)")
    _add_folder_rules(enc)


def _add_dreambooth_parser(sub) -> None:
    db = sub.add_parser(
        "dreambooth", help="a DreamBooth training folder: instance images under a rare-token prompt + generated class images",
        description="Write OUT/metadata.jsonl with the instance images (repeated so that they are drawn about as often "
                    "as the class images) captioned with --instance-prompt, and --num-class-images images the base "
                    "model generates from --class-prompt (prior preservation; ones already in OUT/class are kept). "
                    "Then fine-tune on it: ldm fit --config configs/finetune/dreambooth-lora.yaml "
                    "--model.init_from MODEL --data.root OUT")
    db.add_argument("--instance-dir", required=True, help="folder with the few images of the new concept")
    db.add_argument("--instance-prompt", required=True, help="their caption, with a rare token: 'a photo of sks dog'")
    db.add_argument("--class-prompt", required=True, help="the class without the token: 'a photo of a dog'")
    db.add_argument("--out", required=True, help="output folder (train on it with --data.root)")
    db.add_argument("--model", default=None, help="base model that generates the class images (any layout ldm reads)")
    db.add_argument("--num-class-images", type=non_negative_int, default=100, help="class images (0: no prior preservation)")
    db.add_argument("--repeats", type=positive_int, default=None,
                    help="times each instance image appears (default: about as many instance as class images)")
    db.add_argument("--steps", type=positive_int, default=25, help="sampler steps per class image")
    db.add_argument("--guidance", type=finite_float(0.0), default=5.0, help="classifier-free guidance of the class images")
    db.add_argument("--sampler", default="dpmpp_2m", help="sampler of the class images")
    db.add_argument("--seed", type=int, default=0, help="seed of class image 0 (image i: seed + i)")
    db.add_argument("--batch-size", type=positive_int, default=4, help="class images per model call")
    db.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _dreambooth_main(ns: argparse.Namespace) -> None:
    from ldm.dreambooth import write_dreambooth_set

    made = write_dreambooth_set(ns.instance_dir, ns.out, ns.instance_prompt, ns.class_prompt, model=ns.model,
                                num_class_images=ns.num_class_images, repeats=ns.repeats, steps=ns.steps,
                                guidance=ns.guidance, sampler=ns.sampler, seed=ns.seed, batch_size=ns.batch_size,
                                device=ns.device)
    print(f"Wrote {made.root}: {made.instance_images} instance images x {made.repeats}, {made.class_images} class images "
          f"({made.generated} generated). Fine-tune with --data.root {made.root}")


def _add_folder_rules(parser: argparse.ArgumentParser) -> None:
    """The dataset-folder safety options of ``--data.*`` that a data subcommand reading a folder takes too."""
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="read linked files that lead out of the dataset folder (as --data.follow_symlinks)")
    parser.add_argument("--max-image-pixels", type=positive_int, default=None,
                        help="skip larger images, from their header (as --data.max_image_pixels; default 8192x8192)")


def _folder_rules(ns: argparse.Namespace) -> dict:
    rules = {"follow_symlinks": ns.follow_symlinks}
    if ns.max_image_pixels is not None:
        rules["max_image_pixels"] = ns.max_image_pixels
    return rules


def _encode_main(ns: argparse.Namespace) -> None:
    from ldm.precompute import encode_dataset

    summary = encode_dataset(ns.src, ns.vae, ns.out, text_encoder=ns.text_encoder, text_encoder_layer=ns.text_encoder_layer,
                             image_size=ns.image_size, batch_size=ns.batch_size, device=ns.device, dtype=ns.dtype,
                             chunk_bytes=ns.chunk_bytes, part_size=ns.part_size, data_dir=ns.data_dir,
                             val_fraction=ns.val_fraction, num_workers=ns.num_workers, buckets=ns.buckets,
                             bucket_multiple=ns.bucket_multiple, bucket_max_ratio=ns.bucket_max_ratio, **_folder_rules(ns))
    counts = summary.info["counts"]
    done = "already complete; nothing encoded" if summary.already_complete else "parts written: " + ", ".join(
        f"{name} {len(parts)}" for name, parts in summary.parts_written.items())
    print(f"{ns.out}: {counts['train']} training and {counts['val']} validation latents, {counts['captions']} caption "
          f"embeddings ({done}). Train with --data ldm.data.PrecomputedLatentsDataModule --data.root {ns.out}")
