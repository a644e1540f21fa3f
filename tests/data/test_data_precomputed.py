"""Precomputed latents: `ldm data encode` (moments, captions, splits, text embeddings, resume), the dataset and
DataModule that read them, LatentDiffusion training from them (same losses as the image path; a foreign VAE or text
encoder is refused), and `ldm fit --data PrecomputedLatentsDataModule`."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_VAE, tiny_ldm_kwargs
from ldm.cli import main
from ldm.data import ImageCaptionDataModule, PrecomputedLatentsDataModule, PrecomputedLatentsDataset
from ldm.data.fingerprints import text_encoder_fingerprint, vae_encoder_fingerprint
from ldm.models import AutoencoderKL, LatentDiffusion
from ldm.precompute import encode_dataset
from ldm.nn.autoencoder import KLAutoencoder

VAL_FRACTION = 0.25  # 24 tiny images -> 20 training, 4 validation


@pytest.fixture
def frozen_model_assets(tmp_path, ldm_assets) -> dict[str, Path]:
    """The tiny assets plus the frozen text encoder a seeded LatentDiffusion builds, saved for `--text-encoder`."""
    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(ldm_assets, train_text_encoder=False))
    model.text_encoder.save_pretrained(tmp_path / "text_encoder")
    return {**ldm_assets, "text_encoder": tmp_path / "text_encoder"}


def _encode(assets, out: Path, **kwargs):
    options = dict(batch_size=4, part_size=8, val_fraction=VAL_FRACTION, device="cpu")
    return encode_dataset(str(assets["data"]), assets["vae"], out, **{**options, **kwargs})


def _image_dm(assets) -> ImageCaptionDataModule:
    dm = ImageCaptionDataModule(root=str(assets["data"]), batch_size=4, val_fraction=VAL_FRACTION)
    dm.setup("fit")
    return dm


def test_encode_writes_the_vaes_moments_captions_splits_and_text_embeddings(tmp_path, frozen_model_assets):
    assets = frozen_model_assets
    summary = _encode(assets, tmp_path / "latents", text_encoder=str(assets["text_encoder"]))
    vae = AutoencoderKL.from_pretrained(assets["vae"]).vae.eval()
    from ldm.formats.text_encoder_files import load_text_encoder

    text_encoder = load_text_encoder(assets["text_encoder"]).eval()
    info = json.loads((tmp_path / "latents" / "ldm_latents.json").read_text())
    assert info == summary.info
    assert info["encoder_fingerprint"] == vae_encoder_fingerprint(vae) and info["scaling_factor"] == 0.5
    assert info["text_encoder_fingerprint"] == text_encoder_fingerprint(text_encoder) and info["text_encoder_layer"] == "last"
    assert info["image_size"] == 32 and info["latent_shape"] == [4, 8, 8] and info["dtype"] == "float32"
    assert info["counts"] == {"train": 20, "val": 4, "captions": 49}  # 48 distinct captions + the empty prompt
    assert info["source_path"] == str(Path(assets["data"]).resolve())

    dm = _image_dm(assets)
    for split, images in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        ds = PrecomputedLatentsDataset(tmp_path / "latents", split, train=False)
        assert len(ds) == len(images) and ds.info == info
        pixels = torch.stack([images[i]["image"] for i in range(len(images))])
        with torch.no_grad():  # in the encode's batches of 4 (another batch shape rounds differently, ~1e-6)
            expected = torch.cat([vae.encode(pixels[i : i + 4]).moments for i in range(0, len(pixels), 4)])
        for i in range(len(ds)):
            item = ds[i]
            assert item["moments"].dtype == torch.float32 and item["moments"].shape == (8, 8, 8)
            assert torch.allclose(item["moments"], expected[i], atol=1e-6, rtol=0), (split, i)
            assert ds.captions(i) == images.records[i].captions and item["index"] == i
            assert item["text"] == images.records[i].captions[0]  # eval mode: the first caption
            with torch.no_grad():
                assert torch.allclose(item["context"], text_encoder.encode([item["text"]])[0], atol=1e-5)

    # Training mode draws a caption per access (torch.randint, so seeding applies) and serves its embedding.
    train = PrecomputedLatentsDataset(tmp_path / "latents", "train", train=True)
    torch.manual_seed(0)
    drawn = {train[3]["text"] for _ in range(20)}
    assert drawn == set(dm.train_dataset.records[3].captions)
    captions_only = PrecomputedLatentsDataset(tmp_path / "latents", "train", text_embeddings=False)
    assert "context" not in captions_only[0]
    # Through litdata's downloader and chunk cache, as from object storage (`local:` is litdata's stand-in URL).
    remote = PrecomputedLatentsDataset(f"local:{tmp_path / 'latents'}", "val", train=False, cache_dir=str(tmp_path / "cache"))
    local = PrecomputedLatentsDataset(tmp_path / "latents", "val", train=False)
    assert remote.info == info and all(torch.equal(remote[i]["moments"], local[i]["moments"]) for i in range(len(local)))
    assert torch.equal(remote[1]["context"], local[1]["context"]) and any((tmp_path / "cache").iterdir())

    # float16 storage: half the bytes, read back as float32.
    _encode(assets, tmp_path / "half", dtype="float16")
    half = PrecomputedLatentsDataset(tmp_path / "half", "train", train=False)
    assert half[0]["moments"].dtype == torch.float32 and "context" not in half[0]
    assert torch.allclose(half[0]["moments"], PrecomputedLatentsDataset(tmp_path / "latents", "train")[0]["moments"], atol=2e-3)


def test_interrupted_encode_resumes_with_only_the_missing_parts(tmp_path, ldm_assets, monkeypatch):
    original = KLAutoencoder.encode
    encoded: list[int] = []

    def counting(self, x, fail_after: int | None = None):
        if fail_after is not None and len(encoded) >= fail_after:
            raise KeyboardInterrupt("simulated interruption")
        encoded.append(x.shape[0])
        return original(self, x)

    # Part size 8, batch 4: the first training part is two encoder calls; stop at the third.
    monkeypatch.setattr(KLAutoencoder, "encode", lambda self, x: counting(self, x, fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        _encode(ldm_assets, tmp_path / "resumed")
    assert sum(encoded) == 8 and not (tmp_path / "resumed" / "ldm_latents.json").exists()

    # Other settings do not mix into an unfinished encode.
    monkeypatch.setattr(KLAutoencoder, "encode", lambda self, x: counting(self, x))
    with pytest.raises(FileExistsError, match="dtype"):
        _encode(ldm_assets, tmp_path / "resumed", dtype="float16")

    encoded.clear()
    summary = _encode(ldm_assets, tmp_path / "resumed")
    assert summary.parts_written == {"train": [1, 2], "val": [0]}
    assert sum(encoded) == 20 - 8 + 4  # the rest of the training images, then the validation ones

    encoded.clear()
    again = _encode(ldm_assets, tmp_path / "resumed")
    assert again.already_complete and encoded == [] and again.info == summary.info

    _encode(ldm_assets, tmp_path / "straight")
    for split in ("train", "val"):
        resumed = PrecomputedLatentsDataset(tmp_path / "resumed", split, train=False)
        straight = PrecomputedLatentsDataset(tmp_path / "straight", split, train=False)
        assert len(resumed) == len(straight)
        for i in range(len(straight)):
            a, b = resumed[i], straight[i]
            assert torch.equal(a["moments"], b["moments"]) and a["text"] == b["text"] and resumed.captions(i) == straight.captions(i)
    assert json.loads((tmp_path / "straight" / "ldm_latents.json").read_text())["plan"] == summary.info["plan"]


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(model: LatentDiffusion, dm, tmp_path: Path, steps: int = 3) -> list[float]:
    losses = _Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[losses])
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == steps
    return losses.losses


def test_training_from_precomputed_latents_gives_the_image_paths_losses(tmp_path, frozen_model_assets):
    assets = frozen_model_assets
    _encode(assets, tmp_path / "latents", text_encoder=str(assets["text_encoder"]))
    # A frozen text encoder and heavy caption dropout: the stored context and the empty prompt's are both used.
    kwargs = tiny_ldm_kwargs(assets, train_text_encoder=False, objective={"cond_dropout": 0.5})

    pl.seed_everything(0)
    from_images = _fit(LatentDiffusion(**kwargs), ImageCaptionDataModule(root=str(assets["data"]), batch_size=4,
                                                                         val_fraction=VAL_FRACTION), tmp_path)
    pl.seed_everything(0)
    model = LatentDiffusion(**kwargs)
    calls = {"vae": 0, "text": 0}
    model.autoencoder.encode = lambda x: calls.__setitem__("vae", calls["vae"] + 1)  # must not run
    text_forward = model.text_encoder.forward

    def counted_text(*args, **kw):
        calls["text"] += 1
        return text_forward(*args, **kw)

    model.text_encoder.forward = counted_text
    dm = PrecomputedLatentsDataModule(str(tmp_path / "latents"), batch_size=4, local_shuffle=False)
    from_latents = _fit(model, dm, tmp_path)
    # Same batches, captions, dropout, noise and timesteps; the stored moments and embeddings are the encoders' (up to
    # the rounding of another batch shape), so the losses agree.
    assert from_latents == pytest.approx(from_images, abs=1e-6, rel=0)
    assert calls == {"vae": 0, "text": 0}
    assert torch.equal(model._empty_context, dm.empty_context)


def test_a_foreign_vae_or_text_encoder_is_refused(tmp_path, frozen_model_assets):
    assets = frozen_model_assets
    _encode(assets, tmp_path / "latents", text_encoder=str(assets["text_encoder"]))
    torch.manual_seed(1)
    other = AutoencoderKL(**TINY_VAE)
    other.save_pretrained(tmp_path / "other_vae")

    pl.seed_everything(0)
    model = LatentDiffusion(**tiny_ldm_kwargs(assets, autoencoder=str(tmp_path / "other_vae"), train_text_encoder=False))
    dm = PrecomputedLatentsDataModule(str(tmp_path / "latents"), batch_size=4)
    with pytest.raises(ValueError, match="ldm data encode SRC --vae") as info:
        _fit(model, dm, tmp_path, steps=1)
    message = str(info.value)
    assert dm.encoder_fingerprint in message and vae_encoder_fingerprint(model.autoencoder) in message

    pl.seed_everything(1)  # another random text encoder
    model = LatentDiffusion(**tiny_ldm_kwargs(assets, train_text_encoder=False))
    with pytest.raises(ValueError, match="text_embeddings false") as info:
        _fit(model, PrecomputedLatentsDataModule(str(tmp_path / "latents"), batch_size=4), tmp_path, steps=1)
    assert dm.text_encoder_fingerprint in str(info.value)
    # Without the embeddings, the same model trains (encoding captions itself).
    _fit(model, PrecomputedLatentsDataModule(str(tmp_path / "latents"), batch_size=4, text_embeddings=False), tmp_path, steps=1)


def test_encode_help_and_fit_from_the_cli(tmp_path, frozen_model_assets, capsys, monkeypatch):
    assets = frozen_model_assets
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "encode", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in ("--vae", "--out", "--text-encoder", "--image-size", "--batch-size", "--device", "--dtype", "--chunk-bytes",
                   "--part-size", "--buckets", "--bucket-multiple", "--bucket-max-ratio"):
        assert option in out, option

    latents = tmp_path / "latents"
    main(["data", "encode", str(assets["data"]), "--vae", str(assets["vae"]), "--out", str(latents), "--batch-size", "8",
          "--val-fraction", str(VAL_FRACTION), "--text-encoder", str(assets["text_encoder"]), "--device", "cpu"])
    assert "20 training and 4 validation latents" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "ldm.models.SavePretrained", "init_args": {"dirpath": str(tmp_path / "export")}}]},
        "model": {"class_path": "ldm.models.LatentDiffusion",
                  "init_args": tiny_ldm_kwargs(assets, train_text_encoder=False, validation={"steps": 2}, tokenizer=None,
                                               text_encoder_config=None, text_encoder=str(assets["text_encoder"]))},
        "data": {"class_path": "ldm.data.PrecomputedLatentsDataModule", "init_args": {"root": str(latents), "batch_size": 4}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str))))
    built = []
    setup = LatentDiffusion.setup
    monkeypatch.setattr(LatentDiffusion, "setup", lambda self, stage: (built.append(self.autoencoder), setup(self, stage))[1])
    main(["fit", "--config", str(tmp_path / "fit.yaml")])
    # ldm fit on precomputed latents never builds the VAE's encoder; the export still holds the whole VAE.
    assert built and built[0].encoder is None and built[0].quant_conv is None
    source = load_file(str(assets["vae"] / "model.safetensors"))
    exported = load_file(str(tmp_path / "export" / "vae" / "model.safetensors"))
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[k], source[k]) for k in source)
    # The short form on the command line works too.
    main(["fit", "--config", str(tmp_path / "fit.yaml"), "--data", "PrecomputedLatentsDataModule", "--data.root", str(latents),
          "--data.batch_size", "2", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"])


def test_encode_with_a_whole_models_vae_and_text_encoder(tmp_path):
    from conftest import save_tiny_base_model

    assets, folder = save_tiny_base_model(tmp_path / "base")
    summary = encode_dataset(str(assets["data"]), folder, tmp_path / "latents", text_encoder="same", batch_size=8,
                             val_fraction=VAL_FRACTION, device="cpu")
    info = summary.info
    assert info["image_size"] == 32 and info["text_encoder"] == str(folder) and info["counts"]["captions"] == 49
    # A fine-tune of that model (frozen text encoder) accepts these latents and embeddings.
    model = LatentDiffusion(init_from=str(folder), train_text_encoder=False, validation={"prompts": []})
    assert model.frozen_fingerprints() == {"vae": info["encoder_fingerprint"], "text": info["text_encoder_fingerprint"]}
    # Half-precision frozen weights are fingerprinted before the cast, so they match the fp32 encode too.
    half = LatentDiffusion(init_from=str(folder), train_text_encoder=False, validation={"prompts": []}, frozen_dtype="bf16")
    assert half.autoencoder.encoder.conv_in.weight.dtype == torch.bfloat16
    assert half.frozen_fingerprints() == model.frozen_fingerprints()
    with pytest.raises(ValueError, match="same"):
        encode_dataset(str(assets["data"]), assets["vae"], tmp_path / "x", text_encoder="same")
