"""`python -m rlaif_jax.report WORKDIR`: WORKDIR/report.md with plots, after the main job.

Reads what the stages wrote (the workdir layout of docs/method.md) and writes the small-scale analogue of
the paper's evidence:

- plots (PNG, next to the report): SFT loss, RM accuracy, PPO reward and KL per iteration;
- SFT vs RLAIF on the held-out synthetic questions, by axis (the `eval` stage's results, one row
  per WORKDIR/eval/<name>/results.json);
- the AI judge's agreement with the truth, with vs without the context (feedback metrics);
- RM pairwise accuracy;
- the controls, wherever they were run: stage directories named `<stage>_<control>` (e.g.
  `rm_oracle`, `ppo_oracle`, `ppo_blind`) are read like their stage and shown beside it, and
  eval rows named after them (WORKDIR/eval/oracle/, WORKDIR/eval/blind/) join the table.

Metric keys are looked up by name: the first of a stage's preferred keys that is present, else
any `train/`, `eval/` or `rollout/` key matching the pattern (see METRICS). A stage that has not
run gets a "not run" line instead of a plot; the report never fails for a missing piece.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Optional

from rlaif_jax.eval import results as eval_results
from rlaif_jax.engine.metrics import read_metrics
from rlaif_jax.workdir.files import atomic_write_text

STAGES = ("data", "sft", "policy_init", "feedback", "rm", "ppo", "eval")
# (stage, what) -> (preferred keys, fallback pattern over key names)
METRICS = {
    ("sft", "loss"): (("train/loss",), r"^train/.*loss"),
    # The RM stage writes eval/rm_accuracy_ai (vs the AI judge's labels) and _truth (vs the
    # scorer's); train/accuracy is the training batch's.
    ("rm", "accuracy"): (("eval/rm_accuracy_ai", "eval/accuracy", "eval/rm_accuracy",
                          "train/accuracy"), r"^(eval|train)/.*acc"),
    ("rm", "accuracy_truth"): (("eval/rm_accuracy_truth",), r"^eval/.*acc.*truth"),
    # PPO writes rollout/score_mean (the RM's, or the scorer's for ppo_oracle) and
    # rollout/reward_mean (after the KL and length shaping).
    ("ppo", "reward"): (("rollout/score_mean", "rollout/score", "rollout/reward_mean",
                         "rollout/reward", "rollout/rm_score"), r"^rollout/.*(score|reward)"),
    ("ppo", "kl"): (("rollout/kl", "train/kl"), r"^(rollout|train)/.*kl"),
    ("ppo", "heldout"): (("eval/exact_match",), r"^eval/exact"),
}
AGREEMENT = re.compile(r"agree", re.I)
EVAL_ROW_ORDER = ("sft", "policy_init", "rlaif", "ppo", "oracle", "ppo_oracle", "blind",
                  "ppo_blind")


def _finite(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_stage(workdir: str, stage: str) -> Optional[list[dict]]:
    """The metrics records of WORKDIR/<stage>/metrics.jsonl; None when the stage did not run."""
    path = os.path.join(workdir, stage, "metrics.jsonl")
    return read_metrics(path) if os.path.isfile(path) else None


def find_key(records: list[dict], stage: str, what: str) -> Optional[str]:
    preferred, pattern = METRICS[(stage, what)]
    keys = {k for r in records for k in r if _finite(r[k]) is not None}
    for key in preferred:
        if key in keys:
            return key
    matches = sorted(k for k in keys if re.search(pattern, k))
    return matches[0] if matches else None


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for r in records:
        value = _finite(r.get(key))
        if value is not None and _finite(r.get("step")) is not None:
            steps.append(float(r["step"]))
            values.append(value)
    return steps, values


def _variants(workdir: str, stage: str) -> list[str]:
    """The stage's directory and its controls (`<stage>_<control>`) that hold metrics."""
    names = [stage] if os.path.isfile(os.path.join(workdir, stage, "metrics.jsonl")) else []
    if os.path.isdir(workdir):
        for entry in sorted(os.listdir(workdir)):
            if entry.startswith(stage + "_") and entry not in STAGES and \
                    os.path.isfile(os.path.join(workdir, entry, "metrics.jsonl")):
                names.append(entry)
    return names


def _plot(path: str, panels: list[tuple[str, list[tuple[str, list, list]]]], xlabel: str):
    """One PNG with a panel per (title, [(label, steps, values)])."""
    import matplotlib  # lazy: only the report draws, and it must pick its backend first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels):
        for label, steps, values in lines:
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                      label=label)
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _last(records: list[dict], key: str) -> Optional[float]:
    _, values = series(records, key)
    return values[-1] if values else None


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class _Report:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.lines: list[str] = []
        self.plots: list[str] = []

    def add(self, *lines: str):
        self.lines.extend(lines)

    def not_run(self, what: str, stage: str):
        self.add(f"_{what}: not run (no {os.path.join(stage, 'metrics.jsonl')} in the workdir)._",
                 "")

    def curve_section(self, title: str, stage: str, whats: list[tuple[str, str]], png: str,
                      xlabel: str = "step"):
        """A plot of the stage's (and its controls') metrics; `whats` = [(what, panel title)]."""
        self.add(f"## {title}", "")
        variants = _variants(self.workdir, stage)
        if not variants:
            return self.not_run(title, stage)
        panels, keys_used = [], []
        for what, panel_title in whats:
            lines = []
            for name in variants:
                records = read_stage(self.workdir, name)
                key = find_key(records, stage, what)
                if key is None:
                    continue
                steps, values = series(records, key)
                lines.append((name, steps, values))
                keys_used.append((name, key, values[-1] if values else None))
            if lines:
                panels.append((panel_title, lines))
        if not panels:
            self.add(f"_{title}: the stage ran but logged none of the expected metrics "
                     f"({', '.join(w for w, _ in whats)})._", "")
            return
        _plot(os.path.join(self.workdir, png), panels, xlabel)
        self.plots.append(png)
        self.add(f"![{title}]({png})", "", "| run | metric | last value |", "|---|---|---|")
        self.add(*[f"| {name} | `{key}` | {_fmt(last)} |" for name, key, last in keys_used], "")


def _eval_rows(workdir: str) -> list[dict]:
    root = os.path.join(workdir, "eval")
    rows = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name, "results.json")
            if os.path.isfile(path):
                with open(path) as f:
                    result = json.load(f)
                result["name"] = name
                rows.append(result)
    order = {name: i for i, name in enumerate(EVAL_ROW_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["name"], len(order)), r["name"]))


def build_report(workdir: str) -> str:
    """Writes WORKDIR/report.md (and its PNGs); returns the report's path."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a directory (the main job's workdir)")
    report = _Report(workdir)
    present = [s for s in STAGES if os.path.isdir(os.path.join(workdir, s))]
    report.add(f"# RLAIF at small scale: report of `{os.path.abspath(workdir)}`", "",
               "Stages found: " + (", ".join(present) if present else "none") + ".", "")

    # Held-out evaluation first: it is the claim.
    report.add("## SFT vs RLAIF on held-out synthetic questions", "")
    rows = _eval_rows(workdir)
    if rows:
        report.add("Benchmark axes are mean scores out of 5; QA is accuracy (% correct) / mean "
                   "score out of 5. Judge: " + ", ".join(sorted({str(r.get('judge')) for r in rows}))
                   + ".", "", eval_results.markdown_table(rows), "")
    else:
        report.add("_Evaluation: not run (no eval/<name>/results.json in the workdir)._", "")

    report.add("## The AI judge: agreement with the truth, with vs without context", "")
    feedback = [(name, read_stage(workdir, name)) for name in _variants(workdir, "feedback")]
    agreement = [(name, key, _last(records, key)) for name, records in feedback
                 for key in sorted({k for r in records for k in r if AGREEMENT.search(k)})]
    agreement = [row for row in agreement if row[2] is not None]
    if agreement:
        report.add("| run | metric | value |", "|---|---|---|",
                   *[f"| {n} | `{k}` | {_fmt(v)} |" for n, k, v in agreement], "")
    elif feedback:
        report.add("_The feedback stage ran but logged no agreement metric._", "")
    else:
        report.not_run("Judge agreement", "feedback")

    report.curve_section("Reward model accuracy", "rm",
                         [("accuracy", "RM pairwise accuracy (AI labels)"),
                          ("accuracy_truth", "RM pairwise accuracy (true labels)")],
                         "rm_accuracy.png")
    report.curve_section("SFT loss", "sft", [("loss", "SFT training loss")], "sft_loss.png")
    report.curve_section("PPO reward and KL per iteration", "ppo",
                         [("reward", "reward (RM score; the scorer's for ppo_oracle)"),
                          ("kl", "KL to the reference"),
                          ("heldout", "held-out QA exact match")],
                         "ppo_reward_kl.png", xlabel="iteration")
    path = os.path.join(workdir, "report.md")
    atomic_write_text(path, "\n".join(report.lines).rstrip() + "\n")
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m rlaif_jax.report WORKDIR", file=sys.stderr)
        return 2
    try:
        path = build_report(argv[1])
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
