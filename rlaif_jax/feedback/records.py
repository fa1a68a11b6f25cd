"""The feedback stage's records: one per prompt (the two answers, the context, the judge's
probabilities in both orders, why a pair was dropped; on the synthetic world, graded only, the
scorer's truth), their metrics, and the part files that let a rerun resume.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from rlaif_jax.data import prompts
from rlaif_jax.data.synthetic import scorer, text, video_name
from rlaif_jax.eval.stats import mean_and_se
from rlaif_jax.feedback.judge import apply_margin, question_of
from rlaif_jax.workdir.files import atomic_write_text, read_jsonl


# ---------------------------------------------------------------------------------------------
# Records: one per prompt, with the judge's probabilities and (graded only) the truth


def _video_truth(truths: Optional[dict], images: Any) -> Optional[dict]:
    """The synthetic world's truth of a record's video (None when unknown)."""
    if not truths or not isinstance(images, str):
        return None
    return truths.get(video_name(images))


def truth_of(truths: Optional[dict], images: Any, question: str, a1: str, a2: str
             ) -> dict:
    """The synthetic world's truth about a pair: the scorer's preference and scores ({} when the
    video's truth is unknown)."""
    truth = _video_truth(truths, images)
    if truth is None:
        return {}
    scores = [scorer.score_answer(truth, question, a).score for a in (a1, a2)]
    return {"true_preference": scorer.preference(truth, question, a1, a2),
            "true_scores": [float(s) for s in scores]}


def clip_answer_grades(truths: Optional[dict], images: Any, question: str,
                       context: Optional[str]) -> dict:
    """Graded only, on the synthetic world: whether each clip answer of a `question` or
    `named_clip` context is what its clip shows (`text.clip_answer`); {} for other contexts,
    questions answered by clip descriptions, or unknown videos."""
    truth = _video_truth(truths, images)
    spec = text.parse_question(question)
    if truth is None or not context or spec["type"] in text.DESCRIBED_IN_CLIPS:
        return {}
    given = prompts.numbered_clip_descriptions(context)
    right = text.clip_answers(truth, spec)
    if not given or any(not 1 <= number <= len(right) for number, _ in given):
        return {}
    return {"clip_answers_correct": [g.rstrip(".") == right[number - 1] for number, g in given]}


def clip_answer_accuracy(records: Sequence[dict]) -> dict:
    """Clip answers right against each clip's truth, over all graded clip answers and by
    question type: accuracy, n and standard error."""
    by_type: dict = collections.defaultdict(list)
    for r in records:
        for hit in r.get("clip_answers_correct") or ():
            by_type[question_type(r)].append(float(hit))
            by_type["all"].append(float(hit))
    out = {}
    for kind, hits in sorted(by_type.items()):
        hits = np.asarray(hits)
        out[f"feedback/clip_answer_accuracy/{kind}"] = float(hits.mean())
        out[f"feedback/clip_answer_accuracy/{kind}_n"] = len(hits)
        out[f"feedback/clip_answer_accuracy/{kind}_se"] = float(
            np.sqrt(hits.mean() * (1 - hits.mean()) / len(hits)))
    return out


def preference_item(record: dict) -> dict:
    """A kept record in the reference's preference format (+ confidence, id, the no-context
    judge's preference, and on the synthetic world the truth, for grading and the oracle)."""
    item = {"id": record["id"], "images": record["images"],
            "conversations": [record["question_turn"], {"from": "gpt", "value": ""}],
            "output_1": {"value": record["answers"][0]},
            "output_2": {"value": record["answers"][1]},
            "preference": record["preference"], "confidence": record["confidence"]}
    for key in ("true_preference", "true_scores"):
        if key in record:
            item[key] = record[key]
    p_none = record.get("p_output_1_no_context")
    if p_none is not None:  # the no-context judge's verdict (the context ablation's RM)
        item["preference_no_context"] = 1 if p_none >= 0.5 else 2
    return item


def summarize(records: Sequence[dict], margin: float) -> dict:
    """The feedback metrics of all records (every process's) under `margin`."""
    records = apply_margin(records, margin)
    total = len(records)
    judged = [r for r in records if r.get("p_output_1") is not None]
    kept = [r for r in judged if r["kept"]]
    reasons = collections.Counter(r["drop_reason"] for r in records if r.get("drop_reason"))
    out = {"feedback/prompts": total, "feedback/judged": len(judged), "feedback/kept": len(kept),
           "feedback/kept_fraction": len(kept) / max(total, 1)}
    for reason, count in sorted(reasons.items()):
        out[f"feedback/dropped_{reason}"] = count
    if judged:
        out["feedback/mean_confidence"] = float(np.mean([r["confidence"] for r in judged]))
        out["feedback/position_consistency"] = float(np.mean(
            [(r["p_orders"][0] >= 0.5) == (r["p_orders"][1] >= 0.5) for r in judged]))
    if kept:
        out["feedback/mean_confidence_kept"] = float(np.mean([r["confidence"] for r in kept]))

    def agreement(rows, key, suffix):
        rows = [r for r in rows if "true_preference" in r and r.get(key) is not None]
        if not rows:
            return
        hits = [(1 if r[key] >= 0.5 else 2) == r["true_preference"] for r in rows]
        out[f"feedback/agreement_with_truth{suffix}"] = float(np.mean(hits))
        decisive = [h for h, r in zip(hits, rows) if r["true_scores"][0] != r["true_scores"][1]]
        if decisive:
            out[f"feedback/agreement_with_truth{suffix}_decisive"] = float(np.mean(decisive))
            out[f"feedback/decisive_pairs{suffix}"] = len(decisive)

    with_context = [r for r in judged if r["context_mode"] != "none"]
    agreement(with_context, "p_output_1", "")
    agreement(judged, "p_output_1_no_context", "_no_context")
    agreement(kept, "p_output_1", "_kept")
    truths = [r for r in kept if "true_preference" in r]
    if truths:
        out["feedback/kept_true_preference_2_fraction"] = float(np.mean(
            [r["true_preference"] == 2 for r in truths]))
    out.update(time_localised_agreement(judged))
    out.update(clip_answer_accuracy(records))
    return out


def question_type(record: dict) -> str:
    """The synthetic world's type of a record's question (`describe` for anything else)."""
    return text.parse_question(question_of(record["question_turn"]))["type"]


def time_localised_agreement(judged: Sequence[dict]) -> dict:
    """The judge with and without context on the same time-localised pairs (question types of
    `text.TEMPORAL_TYPES`) whose truth is not a tie: both agreements with the truth, the pairs'
    count and the paired standard error of the gain, sqrt(var(hit_ctx - hit_none) / n)."""
    rows = [r for r in judged
            if r["context_mode"] != "none" and r.get("p_output_1_no_context") is not None
            and "true_preference" in r and r["true_scores"][0] != r["true_scores"][1]
            and question_type(r) in text.TEMPORAL_TYPES]
    if not rows:
        return {"feedback/pairs_time_localised": 0}
    with_context = np.array([(1 if r["p_output_1"] >= 0.5 else 2) == r["true_preference"]
                             for r in rows], np.float64)
    without = np.array([(1 if r["p_output_1_no_context"] >= 0.5 else 2) == r["true_preference"]
                        for r in rows], np.float64)
    return {"feedback/agreement_with_truth_time_localised": float(with_context.mean()),
            "feedback/agreement_with_truth_no_context_time_localised": float(without.mean()),
            "feedback/pairs_time_localised": len(rows),
            "feedback/agreement_gain_se_time_localised": mean_and_se(with_context - without)[1]}


def judged_item(record: dict) -> dict:
    """One line of judged.jsonl: a judged pair, kept or not, with both judges' verdicts."""
    p_none = record.get("p_output_1_no_context")
    return {"id": record["id"], "images": record.get("images"),
            "question_type": question_type(record),
            "question": question_of(record["question_turn"]),
            "output_1": record["answers"][0], "output_2": record["answers"][1],
            "context": record.get("context"), "true_scores": record.get("true_scores"),
            "true_preference": record.get("true_preference"),
            "preference": record["preference"], "confidence": record["confidence"],
            "preference_no_context": None if p_none is None else (1 if p_none >= 0.5 else 2),
            "confidence_no_context": None if p_none is None else max(p_none, 1.0 - p_none),
            "kept": bool(record["kept"])}


# ---------------------------------------------------------------------------------------------
# Part files: one JSON line per finished prompt, so a rerun resumes


def read_records(path: str) -> list[dict]:
    """The complete records of a part file; a line cut by a crash is dropped from the file
    (rewritten atomically), so appending goes on after the last complete record."""
    records, bad = read_jsonl(path)
    if bad:
        logging.warning("feedback: dropping %d incomplete line(s) of %s", bad, path)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for r in records))
    return records


def part_path(directory: str, process_index: int, process_count: int) -> str:
    return os.path.join(directory, f"part-{process_index:05d}-of-{process_count:05d}.jsonl")
