"""launch/main.py end to end on the reverse-string task: bad configs, SIGTERM + exact resume,
and two real processes (jax.distributed on CPU) agreeing with one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.support import ROOT, launch_env

MAIN = [sys.executable, os.path.join(ROOT, "launch", "main.py")]
REVERSE = "--config=" + os.path.join(ROOT, "configs", "sft.py") + ":reverse"


def _run(args, devices=2, timeout=180):
    return subprocess.run(MAIN + args, cwd=ROOT, env=launch_env(devices), capture_output=True,
                          text=True, timeout=timeout)


def _losses(workdir) -> dict:
    with open(os.path.join(workdir, "sft", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _eval(workdir) -> dict:
    with open(os.path.join(workdir, "sft", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "eval/exact_match" in r][-1]


@pytest.mark.parametrize("args,expected", [
    (["--config.optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--config.mesh.data=3", "--config.mesh.fsdp=1"], "needs 3 devices but 2 are present"),
    (["--config.init=/no/such/checkpoint"], "init checkpoint /no/such/checkpoint does not exist"),
])
def test_bad_config_fails_with_one_line(tmp_path, args, expected):
    result = _run([REVERSE, f"--config.workdir={tmp_path}"] + args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()
             and "Involuntary" not in line]
    assert lines == [f"error: {lines[0][len('error: '):]}"] and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_sigterm_then_rerun_resumes_exactly(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = [REVERSE, "--config.num_steps=60", "--config.log.every=1",
              "--config.checkpoint.every=25"]
    assert _run(common + [f"--config.workdir={whole}"]).returncode == 0
    # The uninterrupted run: the workdir layout of docs/method.md, and it learned.
    stage = whole / "sft"
    assert (stage / "config.json").is_file() and list((stage / "tensorboard").iterdir())
    assert sorted(os.listdir(stage / "checkpoints"), key=int) == ["25", "50", "60"]
    losses = _losses(whole)
    assert np.mean([losses[s] for s in range(51, 61)]) < 0.6 * losses[1]
    process = subprocess.Popen(MAIN + common + [f"--config.workdir={cut}"], cwd=ROOT,
                               env=launch_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = cut / "sft" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    saved = int(stderr.split("saved a checkpoint at step ")[1].split(";")[0])
    assert 10 <= saved < 60 and str(saved) in os.listdir(cut / "sft" / "checkpoints")
    again = _run(common + [f"--config.workdir={cut}"])
    assert again.returncode == 0 and f"resuming at step {saved}" in again.stdout
    before, after = _losses(whole), _losses(cut)
    assert sorted(after) == list(range(1, 61))
    for step in range(saved + 1, 61):
        assert after[step] == before[step], step  # the same program on the same data: bitwise
    assert _eval(cut)["eval/loss"] == _eval(whole)["eval/loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    common = [REVERSE, "--config.num_steps=4", "--config.log.every=1", "--config.mesh.data=2",
              "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.eval.num_examples=64",
              "--config.checkpoint.every=2"]
    port = _free_port()
    workers = [subprocess.Popen(
        MAIN + common + [f"--config.workdir={tmp_path / 'two'}",
                         f"--config.distributed.coordinator_address=localhost:{port}",
                         "--config.distributed.num_processes=2",
                         f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=launch_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [w.communicate(timeout=240) for w in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert "2 process(es)" in outputs[0][0]
    one = _run(common + [f"--config.workdir={tmp_path / 'one'}"], devices=8)
    assert one.returncode == 0, one.stderr[-2000:]
    two_losses, one_losses = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two_losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([two_losses[s] for s in range(1, 5)],
                               [one_losses[s] for s in range(1, 5)], rtol=1e-5)
    np.testing.assert_allclose(_eval(tmp_path / "two")["eval/loss"],
                               _eval(tmp_path / "one")["eval/loss"], rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "two" / "sft" / "checkpoints")) == ["2", "4"]
