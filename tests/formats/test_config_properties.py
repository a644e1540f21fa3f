"""Property-based test over model config values (hypothesis): in a subprocess whose address space is capped at what
it holds plus 1 GiB, with a timeout, a saved tiny model with one JSON value made hostile (or deleted) either loads
and generates finite images of its size, or is refused with a ValueError naming the file and the key
(tests/formats/config_fuzz.py holds the strategies and the property)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent / "config_fuzz.py"


def test_a_hostile_config_value_loads_or_is_named_with_its_file():
    out = subprocess.run([sys.executable, str(FUZZ), "600"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    outcomes = ast.literal_eval(out.stdout.split("outcomes:", 1)[1].splitlines()[0].strip())
    assert sum(outcomes.values()) == 600
    assert outcomes["refused, naming file and key"] >= 200 and outcomes["loaded and generated"] >= 50
