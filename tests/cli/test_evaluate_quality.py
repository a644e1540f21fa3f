"""`ldm evaluate quality` and the rFD of `ldm reconstruct`, end to end on a tiny saved model and tiny data (offline)."""

import json

import pytest
import torch
from conftest import save_tiny_base_model
from evaluation_helpers import random_fid_inception_state, save_tiny_clip

from ldm.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny untrained text-to-image model and the 24-image dataset of its assets (captions 'image 7', 'picture 7':
    no word in enough images, so the data's feature network learns rotations and mirrorings instead)."""
    root = tmp_path_factory.mktemp("quality")
    assets, model = save_tiny_base_model(root)
    return {"root": root, "model": model, "data": assets["data"], "vae": assets["vae"]}


def _quality(tiny, *extra: str) -> list[str]:
    return ["evaluate", "quality", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--num-samples", "6",
            "--steps", "2", "--batch-size", "4", "--feature-steps", "20", "--feature-cache", str(tiny["root"] / "cache"),
            *extra]


def test_quality_without_weights_reports_fd_data_with_its_floor_and_says_what_is_missing(tiny, capsys):
    out_json, grid = tiny["root"] / "quality.json", tiny["root"] / "grid.png"
    main(_quality(tiny, "--json", str(out_json), "--grid", str(grid)))
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    metrics = result["metrics"]
    assert set(metrics) == {"fd_data", "kid_data", "kid_data_std", "fd_data_floor", "kid_data_floor", "floor_images"}
    assert metrics["fd_data"] > metrics["fd_data_floor"] > 0 and metrics["floor_images"] == 6
    assert result["labels"] == {"fd_data": "FD_data", "kid_data": "KID_data"}
    assert result["missing"] == {"is": "needs --inception-weights",
                                 "clip_score": "needs --clip-model (the model's own text encoder has no image tower)"}
    network = result["feature_network"]
    assert network["kind"] == "data" and network["objective"] == "transforms" and network["trained_now"]
    assert len(result["prompts"]) == 6 and all(p.startswith(("image ", "picture ")) for p in result["prompts"])
    assert result["num_samples"] == 6 and result["dataset_images"] == 24 and grid.is_file()
    assert "FD_data" in printed and "KID_data" in printed and "IS           needs --inception-weights" in printed
    assert "CLIP score   needs --clip-model" in printed and "never with FID" in printed
    assert "FID " not in printed.replace("never with FID.", "")

    # Again: the cached network, the same samples, the same figures.
    main(_quality(tiny, "--json", str(out_json)))
    again = json.loads(out_json.read_text())
    assert not again["feature_network"]["trained_now"] and again["metrics"] == metrics


def test_quality_with_inception_weights_and_a_clip_model_reports_fid_kid_is_and_clip_score(tiny, capsys):
    weights = tiny["root"] / "pt_inception-random.pth"
    torch.save(random_fid_inception_state(), weights)
    clip = save_tiny_clip(tiny["root"] / "tiny-clip")
    out_json = tiny["root"] / "fid.json"
    main(_quality(tiny, "--num-samples", "3", "--inception-weights", str(weights), "--clip-model", str(clip),
                  "--json", str(out_json)))
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    metrics = result["metrics"]
    assert {"fid", "kid", "kid_std", "fid_floor", "kid_floor", "is", "is_std", "is_real", "clip_score", "clip_score_real"} \
        <= set(metrics)
    assert not any(k.endswith("_data") for k in metrics)
    assert result["labels"] == {"fid": "FID", "kid": "KID", "is": "IS", "clip_score": "CLIP score"}
    assert result["missing"] == {} and result["feature_network"]["kind"] == "inception"
    assert metrics["is"] >= 1.0 and 0 <= metrics["clip_score"] <= 100 and result["clip_model"] == str(clip)
    assert "FID" in printed and "FD_data" not in printed and "needs" not in printed


def test_bad_inputs_are_one_line_errors_naming_the_option(tiny, capsys, tmp_path):
    cases = [
        (["--num-samples", "500"], "num_samples 500 is more than the dataset's 24 images: use --num-samples 24 or fewer"),
        (["--inception-weights", str(tmp_path / "nope.pth")], "nope.pth': no such file"),
        (["--clip-model", str(tmp_path / "no-clip")], "no-clip': no such folder"),
    ]
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02garbage")
    cases.append((["--inception-weights", str(corrupt)], "corrupt.pth' cannot be read as PyTorch weights"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(_quality(tiny, *extra))
        last = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bars)
        assert stop.value.code == 1 and last.startswith("ldm evaluate: error: ") and message in last, (extra, last)


def test_reconstruct_reports_rfd_data(tiny, capsys):
    grid = tiny["root"] / "rec.png"
    common = ["reconstruct", "--model", str(tiny["vae"]), "--data", str(tiny["data"]), "--out", str(grid)]
    main([*common, "--feature-steps", "20", "--feature-cache", str(tiny["root"] / "cache")])
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "rFD_data" in printed and "not with rFID" in printed
    main([*common, "--no-rfd"])
    assert "rFD" not in capsys.readouterr().out
