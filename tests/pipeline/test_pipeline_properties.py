"""Property-based test of the pipeline's call arguments (hypothesis): in a subprocess whose address space is capped
at what it holds plus 1 GiB, with a timeout, every generated call returns finite images of the asked shape or
raises a ValueError naming a wrong argument (tests/pipeline/pipeline_fuzz.py holds the strategies and the oracle)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent / "pipeline_fuzz.py"


def test_every_call_returns_finite_images_or_names_the_wrong_argument():
    out = subprocess.run([sys.executable, str(FUZZ), "1000"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    outcomes = ast.literal_eval(out.stdout.split("outcomes:", 1)[1].splitlines()[0].strip())
    assert sum(outcomes.values()) == 1000
    assert outcomes["returned images"] >= 200  # the valid calls are a good share: the property is not vacuous
    named = {key.removeprefix("refused, naming ") for key in outcomes if key.startswith("refused")}
    assert {"guidance_scale", "eta", "height", "num_inference_steps", "num_images_per_prompt", "seed"} <= named
