"""Property-based run over model config values (hypothesis), meant to run in its own process under a memory limit:
``python tests/formats/config_fuzz.py EXAMPLES``; tests/formats/test_config_properties.py runs it.

A tiny model is saved in our layout and in diffusers'; each example sets one key of one of its JSON files (the UNet,
VAE, text encoder, scheduler configs or model_index.json) to a hostile value, or deletes it, and loads the folder
with ``LatentDiffusionPipeline.from_pretrained``. The property: the folder loads and a one-step generation returns
finite images of the model's size, or a ``ValueError`` is raised naming the file and the key (or, for a
well-typed value that its weights contradict, the file and the tensors whose shapes disagree); never a raw torch or
Python error, an allocation past the cap (the address space is capped at what the process holds plus 1 GiB) or a
hang (a minute per example, and the parent's timeout)."""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "pipeline")]
from test_pipeline import tiny_pipeline  # noqa: E402

from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402

HEADROOM = 1 << 30
FILES = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
         "text_encoder/config.json")
DELETE = "<delete>"
VALUES = st.one_of(
    st.sampled_from([DELETE, None, True, False, 0, -1, -16, 1, 3, 10**9, 10**18, 1e9, 0.5, -0.5, math.nan, math.inf,
                     "16", "", "epsilon", "linear", [], [2], [0], [-1, 2], [1, 2, 4, 8, 16], {}, {"a": 1}]),
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 70), max_size=4))


def main(examples: int) -> None:
    root = Path(tempfile.mkdtemp())
    pipe = tiny_pipeline(root / "tok")
    saved = {fmt: pipe.save_pretrained(root / fmt, format=fmt) for fmt in ("ldm", "diffusers")}
    keys = {(fmt, name): sorted(json.loads((saved[fmt] / name).read_text())) for fmt in saved for name in FILES}
    del pipe
    used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + HEADROOM, used + HEADROOM))
    outcomes: Counter = Counter()

    @st.composite
    def edits(draw):
        fmt = draw(st.sampled_from(sorted(saved)))
        name = draw(st.sampled_from(FILES))
        return fmt, name, draw(st.sampled_from(keys[fmt, name])), draw(VALUES)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(edits())
    def load_edited(edit):
        fmt, name, key, value = edit
        folder = root / "case"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(saved[fmt], folder)
        values = json.loads((folder / name).read_text())
        if value == DELETE:
            del values[key]
        else:
            values[key] = value
        (folder / name).write_text(json.dumps(values))
        started = time.perf_counter()
        try:
            loaded = LatentDiffusionPipeline.from_pretrained(folder)
            out = loaded("a red circle 1", num_inference_steps=1, seed=0, progress=False, output_type="pt")
        except ValueError as exc:
            message = str(exc)
            assert name in message.replace("\\", "/"), (edit, message)
            if key in message:
                outcomes["refused, naming file and key"] += 1
            else:  # a well-typed value the weights contradict: the file and the tensors that disagree are named
                assert "does not describe its weights" in message, (edit, message)
                outcomes["refused, naming file and the weights that disagree"] += 1
            return
        finally:
            assert time.perf_counter() - started < 60, f"an example took over a minute: {edit}"
        size = loaded.sample_size
        assert tuple(out.images.shape) == (1, 3, size, size) and bool(torch.isfinite(out.images).all()), edit
        outcomes["loaded and generated"] += 1

    load_edited()
    print("outcomes:", dict(sorted(outcomes.items())))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
