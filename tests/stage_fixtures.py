"""Session fixtures of the whole chain on the `smoke` presets, shared by every stage's tests.

`smoke_workdir` runs `launch/main.py --config=configs/sft.py:smoke` once per test session (one
process, one CPU device, as a user would from a fresh checkout) and returns the workdir: the
synthetic world and its builds under data/, the trained SFT stage under sft/. Later stages'
smoke tests (reward model, PPO) start from it (`--config.init=stage:sft` or WORKDIR/sft).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def override(config, **changes):
    """`config` with dotted keys set in place (`**{"lora.rank": 4}`), as --config.x=y would."""
    with config.unlocked():
        for key, value in changes.items():
            node = config
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    return config


def launch(args: list[str], devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs launch/main.py in a fresh process with `devices` CPU devices."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py")] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_smoke_sft(workdir: str) -> subprocess.CompletedProcess:
    result = launch(["--config=" + os.path.join(ROOT, "configs", "sft.py") + ":smoke",
                     f"--config.workdir={workdir}", "--config.log.progress=false"],
                    timeout=900)  # a loaded shared machine has taken over 5 minutes
    if result.returncode != 0:
        raise RuntimeError(f"the SFT smoke stage failed:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory) -> str:
    """A workdir holding the trained `smoke` SFT stage (made once per session)."""
    path = tmp_path_factory.getbasetemp() / "smoke_workdir"
    marker = path / ".sft_complete"
    if not marker.exists():
        path.mkdir(parents=True, exist_ok=True)
        result = run_smoke_sft(str(path))
        (path / "sft_stdout.txt").write_text(result.stdout)
        marker.touch()
    return str(path)
