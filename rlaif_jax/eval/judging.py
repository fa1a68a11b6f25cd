"""What a judge is asked and what it answers, shared by every judge.

A `JudgeTask` is one prediction to grade on one axis ("qa" or a benchmark axis). A judge maps
tasks to `Judgement`s, yielding each as soon as it is ready (so the runner can save it at once
and a crash loses at most the judgements in flight). A judgement either holds a score (and a
yes / no verdict for QA) or an `error`:

- a `final` failure (an unreadable reply after the allowed re-asks) is a result: it is saved,
  counted in the summary, and not asked again on a rerun;
- a non-final failure (the endpoint timed out or kept refusing after every retry) is not a
  result: it is counted, and a rerun asks again.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Optional, Protocol


@dataclasses.dataclass(frozen=True)
class JudgeTask:
    item_id: str
    axis: str  # "qa" or one of data.prompts.BENCHMARK_AXES
    question: str
    answer: str  # the ground truth
    prediction: str
    video_name: str = ""
    question_2: str = ""  # consistency: the paraphrased question and its prediction
    prediction_2: str = ""

    @property
    def key(self) -> str:
        return f"{self.item_id}|{self.axis}"


@dataclasses.dataclass(frozen=True)
class Judgement:
    item_id: str
    axis: str
    score: Optional[float] = None
    pred: Optional[str] = None
    error: Optional[str] = None
    final: bool = True  # False: a transport failure, to be retried by a rerun
    reply: Optional[str] = None  # the judge's raw reply, kept for inspection
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def key(self) -> str:
        return f"{self.item_id}|{self.axis}"

    def as_record(self, judge_name: str) -> dict:
        record = dataclasses.asdict(self)
        record["judge"] = judge_name
        return record


class Judge(Protocol):
    name: str  # saved with each judgement: judgements of another judge are not reused

    def judge(self, tasks: Iterable[JudgeTask]) -> Iterator[Judgement]:
        """One judgement per task, in any order, each yielded when ready."""
        ...
