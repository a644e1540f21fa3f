"""The ldm command's thread policy: OMP_WAIT_POLICY=PASSIVE set before torch loads, unless the user chose one."""

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, sys\n"
    "from ldm import cli\n"
    "assert 'torch' not in sys.modules\n"
    "try:\n"
    "    cli.main(['evaluate', '--help'])\n"
    "except SystemExit:\n"
    "    pass\n"
    "import torch\n"
    "print(os.environ.get('OMP_WAIT_POLICY'))\n"
)


def _run(code: str, **env_overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_ldm_command_sets_passive_waiting_before_torch_loads():
    assert _run(PROBE) == "PASSIVE"


def test_users_choice_is_kept():
    assert _run(PROBE, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


@pytest.mark.parametrize("torch_first", [False, True])
def test_policy_only_applies_before_torch_is_imported(torch_first):
    code = ("import torch\n" if torch_first else "") + (
        "import os\nfrom ldm.threads import apply_thread_policy\n"
        "print(apply_thread_policy(), os.environ.get('OMP_WAIT_POLICY'))"
    )
    assert _run(code) == ("False None" if torch_first else "True PASSIVE")
