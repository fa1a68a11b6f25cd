"""The evaluation sets: zero-shot video QA and the Video-ChatGPT benchmark, in the reference's
JSON formats (docs/method.md), and the reference's prediction format.

- QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA, and the synthetic world's `eval_qa.json`):
  `[{video_name, question_id, question, answer}]`; predictions `{id, question, answer, pred}`.
- Benchmark generic / temporal: `[{video_name, Q, A}]`; predictions add `pred`.
- Benchmark consistency: `[{video_name, Q1, Q2, A}]`; predictions add `pred1`, `pred2`.

Benchmark items have no id: ours is `{video_name}#{index in the file}`, stable while the file is.
An item without its fields is skipped and counted, never fatal.
"""

from __future__ import annotations

import collections
import dataclasses
import json

from rlaif_jax.data.prompts import QA_AXIS
from rlaif_jax.eval.judging import JudgeTask

QA_TASKS = ("msvd_qa", "msrvtt_qa", "activitynet_qa", "synthetic_qa")
BENCHMARK_TASKS = ("generic", "temporal", "consistency")
TASKS = QA_TASKS + BENCHMARK_TASKS
TASK_AXES = {**{task: (QA_AXIS,) for task in QA_TASKS},
             "generic": ("correctness", "detail", "context"),
             "temporal": ("temporal",),
             "consistency": ("consistency",)}
# The synthetic world's file for each task (rlaif_jax/data/synthetic/generate.py).
WORLD_FILES = {"synthetic_qa": "eval_qa.json", "generic": "eval_generic.json",
               "temporal": "eval_temporal.json", "consistency": "eval_consistency.json"}


@dataclasses.dataclass(frozen=True)
class EvalItem:
    id: str
    video_name: str
    questions: tuple  # one question, or two (consistency)
    answer: str
    record: dict  # the item as read, for the prediction file

    def question_keys(self) -> list[str]:
        """One key per question the model must answer (what the answers store is keyed by)."""
        if len(self.questions) == 1:
            return [self.id]
        return [f"{self.id}#q{k + 1}" for k in range(len(self.questions))]


def _text(record: dict, key: str):
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value.strip() else None


def parse_items(task: str, records) -> tuple[list[EvalItem], collections.Counter]:
    """(items, skipped counts by reason) of one task's JSON list."""
    if task not in TASK_AXES:
        raise ValueError(f"unknown evaluation task {task!r}; expected one of {list(TASKS)}")
    if not isinstance(records, list):
        raise ValueError(f"{task}: expected a JSON list of items")
    question_keys = {"consistency": ("Q1", "Q2")}.get(task, ("question",) if task in QA_TASKS
                                                      else ("Q",))
    answer_key = "answer" if task in QA_TASKS else "A"
    items, skipped, seen = [], collections.Counter(), set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            skipped["not_an_object"] += 1
            continue
        name = _text(record, "video_name")
        questions = tuple(_text(record, key) for key in question_keys)
        answer = _text(record, answer_key)
        if task in QA_TASKS:
            item_id = _text(record, "question_id")
        else:
            item_id = f"{name}#{index}" if name else None
        if name is None:
            skipped["no_video_name"] += 1
        elif None in questions:
            skipped["no_question"] += 1
        elif answer is None:
            skipped["no_answer"] += 1
        elif item_id is None:
            skipped["no_question_id"] += 1
        elif item_id in seen:
            skipped["duplicate_id"] += 1
        else:
            seen.add(item_id)
            items.append(EvalItem(item_id, name, questions, answer, record))
    return items, skipped


def load_items(task: str, path: str) -> tuple[list[EvalItem], collections.Counter]:
    with open(path) as f:
        return parse_items(task, json.load(f))


def prediction_record(task: str, item: EvalItem, answers: list) -> dict:
    """The reference's prediction entry for an item, given its answers (None when skipped)."""
    if task in QA_TASKS:
        return {"id": item.id, "question": item.questions[0], "answer": item.answer,
                "pred": answers[0]}
    record = {"video_name": item.video_name}
    if task == "consistency":
        record.update(Q1=item.questions[0], Q2=item.questions[1], A=item.answer,
                      pred1=answers[0], pred2=answers[1])
    else:
        record.update(Q=item.questions[0], A=item.answer, pred=answers[0])
    record["id"] = item.id
    return record


def judge_tasks(task: str, item: EvalItem, answers: list) -> list[JudgeTask]:
    """What to ask the judge about an item (nothing when an answer is missing)."""
    if any(a is None for a in answers):
        return []
    second = dict(question_2=item.questions[1], prediction_2=answers[1]) \
        if task == "consistency" else {}
    return [JudgeTask(item_id=item.id, axis=axis, question=item.questions[0], answer=item.answer,
                      prediction=answers[0], video_name=item.video_name, **second)
            for axis in TASK_AXES[task]]
