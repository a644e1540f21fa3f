"""`ldm data dreambooth` writes a DreamBooth folder (instance images repeated under the rare-token prompt, class images
the base model generates, kept across reruns) that the shipped dreambooth-lora config fine-tunes a tiny model on; bad
input is one line naming the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.pipeline import LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parents[2]
INSTANCE, CLASS = "a photo of sks image", "an image"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import save_tiny_base_model

    root = tmp_path_factory.mktemp("db")
    assets, base = save_tiny_base_model(root)
    instances = root / "my_concept"
    instances.mkdir()
    for name in ("000.png", "001.png", "002.png"):
        shutil.copyfile(assets["data"] / "images" / name, instances / name)
    (instances / "notes.txt").write_text("not an image")  # ignored
    return base, instances


def _dreambooth(base, instances, out, *extra):
    main(["data", "dreambooth", "--instance-dir", str(instances), "--instance-prompt", INSTANCE, "--class-prompt", CLASS,
          "--model", str(base), "--steps", "2", "--device", "cpu", "--out", str(out), *extra])
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_folder_layout_repeats_and_class_images_kept_across_reruns(tiny, tmp_path, capsys):
    base, instances = tiny
    out = tmp_path / "db"
    rows = _dreambooth(base, instances, out, "--num-class-images", "6")
    assert "3 instance images x 2, 6 class images (6 generated)" in capsys.readouterr().out
    inst = [r for r in rows if r["kind"] == "instance"]
    cls = [r for r in rows if r["kind"] == "class"]
    assert len(inst) == 6 and {r["text"] for r in inst} == {INSTANCE} and {r["split"] for r in inst} == {"train"}
    assert len(cls) == 6 and {r["text"] for r in cls} == {CLASS} and all("split" not in r for r in cls)
    for r in inst:  # each a copy of its source
        source = instances / (r["file_name"].split("-")[1] + ".png")
        assert (out / r["file_name"]).read_bytes() == source.read_bytes()
    first = {r["file_name"]: (out / r["file_name"]).read_bytes() for r in cls}
    assert all(Image.open(out / f).size == (32, 32) for f in first)
    assert len(set(first.values())) == 6  # image i has seed + i

    (out / "class" / "00003.png").unlink()
    rows = _dreambooth(base, instances, out, "--num-class-images", "8", "--repeats", "1")
    assert "3 instance images x 1, 8 class images (3 generated)" in capsys.readouterr().out
    assert sum(r["kind"] == "instance" for r in rows) == 3 and len(list((out / "instance").iterdir())) == 3
    again = {r["file_name"]: (out / r["file_name"]).read_bytes() for r in rows if r["kind"] == "class"}
    assert {f: again[f] for f in first} == first  # kept, and the regenerated 00003 is the same image


def test_dreambooth_lora_config_trains_on_the_folder(tiny, tmp_path, monkeypatch):
    base, instances = tiny
    out = tmp_path / "db"
    _dreambooth(base, instances, out, "--num-class-images", "20", "--repeats", "4")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "finetune" / "dreambooth-lora.yaml"), "--model.init_from", str(base),
          "--data.root", str(out), "--data.image_size", "32", "--data.batch_size", "4", "--data.num_workers", "0",
          "--data.val_fraction", "0.25", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
          "--model.validation.steps", "2"])
    adapter = tmp_path / "checkpoints" / "dreambooth-lora"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    pipe = LatentDiffusionPipeline.from_pretrained(base).load_lora(adapter)
    images = pipe(INSTANCE, num_inference_steps=2, seed=0, output_type="pt", progress=False).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("change, message", [
    (("--instance-dir", "nowhere"), "instance image folder"),
    (("--instance-dir", "empty"), "no images in"),
    (("--instance-prompt", " "), "instance prompt is empty"),
    (("--class-prompt", INSTANCE), "are the same"),
    (("--model", None), "give the base model (--model)"),
])
def test_bad_input_is_one_line_naming_the_fix(tiny, tmp_path, capsys, change, message):
    base, instances = tiny
    (tmp_path / "empty").mkdir()
    args = {"--instance-dir": str(instances), "--instance-prompt": INSTANCE, "--class-prompt": CLASS,
            "--model": str(base), "--out": str(tmp_path / "db"), "--num-class-images": "2"}
    option, value = change
    if value is None:
        del args[option]
    else:
        args[option] = str(tmp_path / value) if option == "--instance-dir" else value
    with pytest.raises(SystemExit) as stop:
        main(["data", "dreambooth", *[x for kv in args.items() for x in kv]])
    err = capsys.readouterr().err.strip()
    assert stop.value.code in (1, 2) and len(err.splitlines()) == 1 and message in err, err


def test_a_corrupt_instance_image_is_named(tiny, tmp_path, capsys):
    _, instances = tiny
    bad = tmp_path / "bad"
    shutil.copytree(instances, bad)
    (bad / "003.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit):
        main(["data", "dreambooth", "--instance-dir", str(bad), "--instance-prompt", INSTANCE, "--class-prompt", CLASS,
              "--num-class-images", "0", "--out", str(tmp_path / "db")])
    assert "003.png" in capsys.readouterr().err


def test_instance_images_inside_the_output_are_refused_not_deleted(tiny, tmp_path, capsys):
    _, instances = tiny
    inside = tmp_path / "db" / "instance"
    shutil.copytree(instances, inside)
    with pytest.raises(SystemExit):
        main(["data", "dreambooth", "--instance-dir", str(inside), "--instance-prompt", INSTANCE, "--class-prompt", CLASS,
              "--num-class-images", "0", "--out", str(tmp_path / "db")])
    assert "outside --out" in capsys.readouterr().err
    assert sorted(p.name for p in inside.iterdir()) == sorted(p.name for p in instances.iterdir())
