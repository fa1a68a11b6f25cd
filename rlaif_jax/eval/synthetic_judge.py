"""The synthetic world's scorer as a judge: exact grades, because the truth is known.

Grades map onto the reference's 0-5 scale (5 x the scorer's fraction):
- qa: 'yes' when the answer is right (`Score.correct`), score 5 x `Score.score`;
- correctness, detail, temporal: the scorer's axes of the same names (an axis that does not
  apply to the item, e.g. temporal for a video without events, falls back to the overall score);
- context: the overall score (the scorer has no separate notion of staying on topic);
- consistency: 5 x the lower of the two answers' scores: both paraphrases must be answered well.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from rlaif_jax.data.prompts import QA_AXIS, SCORE_MAX
from rlaif_jax.data.synthetic import scorer
from rlaif_jax.eval.judging import Judgement, JudgeTask


class SyntheticJudge:
    def __init__(self, world_dir: str):
        path = os.path.join(world_dir, "truth.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"judge.world: {path} does not exist (not a synthetic world)")
        with open(path) as f:
            self.truth = json.load(f)
        self._scorer = scorer
        self.name = "synthetic"

    def judge_one(self, task: JudgeTask) -> Judgement:
        truth = self.truth.get(task.video_name)
        if truth is None:
            return Judgement(task.item_id, task.axis, error="unknown_video")
        score = self._scorer.score_answer(truth, task.question, task.prediction)
        if task.axis == QA_AXIS:
            return Judgement(task.item_id, task.axis, score=SCORE_MAX * score.score,
                             pred="yes" if score.correct else "no")
        if task.axis == "consistency":
            second = self._scorer.score_answer(truth, task.question_2, task.prediction_2)
            value = min(score.score, second.score)
        elif task.axis in ("correctness", "detail", "temporal"):
            value = getattr(score, task.axis)
            value = score.score if value is None else value
        elif task.axis == "context":
            value = score.score
        else:
            return Judgement(task.item_id, task.axis, error="unknown_axis")
        return Judgement(task.item_id, task.axis, score=SCORE_MAX * float(value))

    def judge(self, tasks: Iterable[JudgeTask]) -> Iterator[Judgement]:
        for task in tasks:
            yield self.judge_one(task)
