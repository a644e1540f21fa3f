"""The ldm command's thread policy: OMP_WAIT_POLICY=PASSIVE before torch loads when other processes keep the CPUs
busy, nothing on an idle machine, and never over the user's choice."""

import os
import subprocess
import sys

import pytest

from ldm.threads import busy_cores

PROBE = (
    "import os, sys\n"
    "from ldm import cli, threads\n"
    "threads.busy_cores = lambda: {busy}\n"
    "assert 'torch' not in sys.modules\n"
    "try:\n"
    "    cli.main(['evaluate', '--help'])\n"
    "except SystemExit:\n"
    "    pass\n"
    "import torch\n"
    "print(os.environ.get('OMP_WAIT_POLICY'))\n"
)


def _run(code: str, **env_overrides: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1], out.stderr


def test_busy_machine_makes_the_ldm_command_use_passive_waiting_and_say_so():
    policy, stderr = _run(PROBE.format(busy=1.0))
    assert policy == "PASSIVE" and "OMP_WAIT_POLICY=PASSIVE" in stderr


def test_idle_machine_keeps_torchs_default():
    assert _run(PROBE.format(busy=0.1))[0] == "None"


def test_one_thread_is_left_alone():
    assert _run(PROBE.format(busy=1.0), OMP_NUM_THREADS="1")[0] == "None"


def test_users_choice_is_kept():
    assert _run(PROBE.format(busy=1.0), OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE"


@pytest.mark.parametrize("torch_first", [False, True])
def test_policy_only_applies_before_torch_is_imported(torch_first):
    code = ("import torch\n" if torch_first else "") + (
        "import os\nfrom ldm.threads import apply_thread_policy\n"
        "print(apply_thread_policy(probe=lambda: 2.0), os.environ.get('OMP_WAIT_POLICY'))"
    )
    assert _run(code)[0] == ("False None" if torch_first else "True PASSIVE")


def test_busy_cores_sees_a_busy_process():
    idle = busy_cores(0.3)
    if idle is None:
        pytest.skip("no /proc/stat on this system")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0 <= idle <= (os.cpu_count() or 1) + 0.01
    assert busy >= 0.7  # one spinning process is (nearly) a whole core
