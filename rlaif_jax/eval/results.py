"""Scores from judgements, and the results table (JSON and markdown).

Per QA task: accuracy = share of 'yes' among the judged predictions (x100, as the papers
report it) and the mean 0-5 score. Per benchmark axis: the mean 0-5 score. Every count that
explains a gap is kept next to the score: items, answered, judged, skipped items by reason,
unreadable judge replies by reason, judgements lost in transport.
"""

from __future__ import annotations

import collections
import os

from rlaif_jax.eval import tasks as tasks_lib
from rlaif_jax.data.prompts import BENCHMARK_AXES, QA_AXIS
from rlaif_jax.workdir.files import atomic_write_json, atomic_write_text

QA_TITLES = {"msvd_qa": "MSVD-QA", "msrvtt_qa": "MSRVTT-QA", "activitynet_qa": "ActivityNet-QA",
             "synthetic_qa": "Synthetic-QA"}


def _mean(values):
    return sum(values) / len(values) if values else None


def summarise(name, judge, plan, judgements, judge_tasks, skipped, unsaved) -> dict:
    """results = {"name", "judge", "tasks": {task: {...}}, "axes": {axis: mean score}}."""
    out = {"name": name, "judge": judge, "tasks": {}, "axes": {}}
    axis_scores = collections.defaultdict(list)
    for task, (items, answers, _) in plan.items():
        keys = [k for item in items for k in item.question_keys()]
        answer_errors = collections.Counter(answers[k]["error"] for k in keys
                                            if k in answers and answers[k].get("error"))
        answered_items = sum(all(answers.get(k, {}).get("answer") is not None
                                 for k in item.question_keys()) for item in items)
        wanted = {t.key for t in judge_tasks[task]}
        records = [r for key, r in judgements[task].items() if key in wanted]
        good = [r for r in records if r.get("error") is None]
        failures = collections.Counter(r["error"] for r in records if r.get("error"))
        lost = {k.split(":", 1)[1]: v for k, v in unsaved.items() if k.split(":", 1)[0] == task}
        entry = {"file_items_skipped": dict(skipped.get(task, {})), "items": len(items),
                 "answered": answered_items, "answer_errors": dict(answer_errors),
                 "judgements_expected": len(wanted), "judged": len(good),
                 "judge_failures": dict(failures), "judge_not_reached": lost}
        if task in tasks_lib.QA_TASKS:
            qa = [r for r in good if r["axis"] == QA_AXIS]
            entry["accuracy"] = (100.0 * sum(r["pred"] == "yes" for r in qa) / len(qa)
                                 if qa else None)
            entry["score"] = _mean([r["score"] for r in qa])
        else:
            for axis in tasks_lib.TASK_AXES[task]:
                scores = [r["score"] for r in good if r["axis"] == axis]
                entry[axis] = _mean(scores)
                axis_scores[axis] += scores
        out["tasks"][task] = entry
    out["axes"] = {axis: _mean(axis_scores[axis]) for axis in BENCHMARK_AXES if axis_scores[axis]}
    return out


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """One row per results dict: benchmark axes (0-5), then each QA task's accuracy / score."""
    axes = [a for a in BENCHMARK_AXES if any(a in r.get("axes", {}) for r in rows)]
    qa_tasks = [t for t in tasks_lib.QA_TASKS if any(t in r.get("tasks", {}) for r in rows)]
    header = ["model"] + axes + [f"{QA_TITLES[t]} acc / score" for t in qa_tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r.get("name"))]
        cells += [_fmt(r["axes"].get(a)) for a in axes]
        for task in qa_tasks:
            entry = r["tasks"].get(task)
            cells.append("-" if entry is None else
                         f"{_fmt(entry.get('accuracy'), 1)} / {_fmt(entry.get('score'))}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _counts_table(results: dict) -> str:
    lines = ["| task | items | answered | judged / expected | skipped in file | answer errors "
             "| judge failures | not reached |", "|---|---|---|---|---|---|---|---|"]
    for task, e in results["tasks"].items():
        lines.append(f"| {task} | {e['items']} | {e['answered']} | {e['judged']} / "
                     f"{e['judgements_expected']} | {e['file_items_skipped'] or '-'} | "
                     f"{e['answer_errors'] or '-'} | {e['judge_failures'] or '-'} | "
                     f"{e['judge_not_reached'] or '-'} |")
    return "\n".join(lines)


def write(results: dict, output_dir: str) -> None:
    atomic_write_json(os.path.join(output_dir, "results.json"), results)
    text = (f"# Evaluation of {results['name']}\n\nJudge: {results['judge']}. Benchmark axes "
            "are mean scores out of 5; QA is accuracy (% judged correct) / mean score out of "
            f"5.\n\n{markdown_table([results])}\n\n## Counts\n\n{_counts_table(results)}\n")
    atomic_write_text(os.path.join(output_dir, "results.md"), text)
