"""The report over a workdir of fake metrics with the documented key names."""

import json
import subprocess
import sys

from rlaif_jax.workdir.files import atomic_write_json
from rlaif_jax.report import build_report


def _metrics(path, stage, rows):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step, values in rows:
            f.write(json.dumps({"step": step, "stage": stage, **values}) + "\n")


def _eval_result(workdir, name, correctness, accuracy):
    result = {"name": name, "judge": "synthetic",
              "axes": {"correctness": correctness, "detail": 2.0, "temporal": 1.5},
              "tasks": {"synthetic_qa": {"accuracy": accuracy, "score": accuracy / 20}}}
    atomic_write_json(str(workdir / "eval" / name / "results.json"), result)


def test_full_workdir(tmp_path):
    w = tmp_path / "workdir"
    _metrics(w / "sft", "sft", [(s, {"train/loss": 3.0 - s / 50, "train/lr": 1e-3})
                                for s in range(0, 100, 10)] + [(100, {"train/loss": "nan"})])
    _metrics(w / "feedback", "feedback", [(0, {"eval/judge_agreement_context": 0.81,
                                               "eval/judge_agreement_no_context": 0.64})])
    _metrics(w / "rm", "rm", [(s, {"train/loss": 0.7, "eval/accuracy": 0.5 + s / 1000})
                              for s in (0, 100, 200)])
    _metrics(w / "rm_oracle", "rm", [(s, {"eval/accuracy": 0.6 + s / 1000}) for s in (0, 200)])
    _metrics(w / "ppo", "ppo", [(i, {"rollout/score": 0.1 * i, "rollout/kl": 0.01 * i})
                                for i in range(8)])
    _metrics(w / "ppo_blind", "ppo", [(i, {"rollout/score": 0.05 * i}) for i in range(8)])
    _eval_result(w, "rlaif", 3.5, 70.0)
    _eval_result(w, "sft", 2.75, 55.0)
    _eval_result(w, "blind", 1.25, 30.0)

    result = subprocess.run([sys.executable, "-m", "rlaif_jax.report", str(w)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = (w / "report.md").read_text()
    for png in ("sft_loss.png", "rm_accuracy.png", "ppo_reward_kl.png"):
        assert f"]({png})" in report
        assert (w / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # SFT first, then RLAIF, then the controls; numbers as in the results files.
    table = [line for line in report.splitlines()
             if line.split(" | ")[0] in ("| sft", "| rlaif", "| blind") and "`" not in line]
    assert table == ["| sft | 2.75 | 2.00 | 1.50 | 55.0 / 2.75 |",
                     "| rlaif | 3.50 | 2.00 | 1.50 | 70.0 / 3.50 |",
                     "| blind | 1.25 | 2.00 | 1.50 | 30.0 / 1.50 |"]
    assert "| feedback | `eval/judge_agreement_context` | 0.810 |" in report
    assert "| feedback | `eval/judge_agreement_no_context` | 0.640 |" in report
    assert "| rm | `eval/accuracy` | 0.700 |" in report
    assert "| rm_oracle | `eval/accuracy` | 0.800 |" in report
    assert "| ppo | `rollout/kl` | 0.070 |" in report
    assert "| ppo_blind | `rollout/score` | 0.350 |" in report
    assert "| sft | `train/loss` | 1.200 |" in report  # the NaN line is skipped
    assert "not run" not in report


def test_partial_workdir_says_what_did_not_run(tmp_path):
    w = tmp_path / "workdir"
    _metrics(w / "sft", "sft", [(0, {"train/loss": 2.0}), (10, {"train/loss": 1.0})])
    _metrics(w / "ppo", "ppo", [(0, {"train/policy_loss": 0.1})])  # no reward or KL logged
    path = build_report(str(w))
    report = open(path).read()
    assert (w / "sft_loss.png").exists() and not (w / "rm_accuracy.png").exists()
    assert "_Evaluation: not run" in report
    assert "_Judge agreement: not run" in report
    assert "_Reward model accuracy: not run" in report
    assert "the stage ran but logged none of the expected metrics" in report
    assert not (w / "ppo_reward_kl.png").exists()


def test_missing_workdir_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rlaif_jax.report", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.splitlines()) == 1
