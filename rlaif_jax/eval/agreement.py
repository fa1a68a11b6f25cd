"""Where the judge and the reward model agree with the synthetic world's truth.

    python -m rlaif_jax.eval.agreement WORKDIR/feedback/preferences.json [--rm WORKDIR/rm ...]

The feedback and RM stages log one agreement number each. This splits it by question type (the
world's templates), by the gap between the two answers' true scores (a tie is decided by
conciseness) and, for the judge, by its confidence, so that one sees which facts the judge, and
the RM learnt from it, can check. With --rm, each RM stage's held-out pairs are scored by its
newest checkpoint. The preference file must carry `true_preference` and `true_scores`, as the
feedback stage writes them on the synthetic world.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Iterable, Sequence

import jax
import numpy as np
import transformers

from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.data.synthetic import parse_question
from rlaif_jax.engine.pretrained import load_stage, stage_config, stage_tokenizer_dir
from rlaif_jax.rm.model import pair_rewards
from rlaif_jax.rm.stage import heldout_verdicts

GAP_BINS = ((0.0, 0.0, "tie"), (0.0, 0.1, "(0, 0.1)"), (0.1, 0.3, "[0.1, 0.3)"),
            (0.3, 1.0, "[0.3, 1]"))


def question_type(item: dict) -> str:
    return parse_question(item["conversations"][0]["value"])["type"]


def gap_bin(scores: Sequence[float]) -> str:
    gap = abs(scores[0] - scores[1])
    if gap == 0:
        return GAP_BINS[0][2]
    for _, high, name in GAP_BINS[1:-1]:
        if gap < high:
            return name
    if gap <= GAP_BINS[-1][1]:
        return GAP_BINS[-1][2]
    raise ValueError(f"true scores {scores} outside [0, 1]")


def judged_rows(items: Iterable[dict]) -> list[dict]:
    """One row per item with a truth: what the judge said (the file's `preference`)."""
    rows = []
    for item in items:
        if item.get("true_preference") not in (1, 2) or not item.get("true_scores"):
            continue
        rows.append({"type": question_type(item), "gap": gap_bin(item["true_scores"]),
                     "confidence": float(item.get("confidence", 0.5)),
                     "said": int(item["preference"]), "truth": int(item["true_preference"])})
    return rows


def confidence_bins(rows: list[dict], parts: int = 4) -> list[str]:
    """Each row's quantile bin of the judge's confidence ('q1' lowest .. 'qN')."""
    values = np.array([r["confidence"] for r in rows])
    edges = np.quantile(values, np.linspace(0, 1, parts + 1)[1:-1]) if len(values) else []
    return [f"q{int(np.searchsorted(edges, v, side='right')) + 1}" for v in values]


def breakdown(rows: list[dict], group: str, against: str = "truth",
              order: Sequence[str] | None = None) -> dict[str, tuple]:
    """{group value: (pairs, accuracy of `said` against `against`)}, 'all' first, then the
    values in `order` or by number of pairs; a tie said as 0.5 counts one half."""
    hits = collections.defaultdict(list)
    for row in rows:
        hit = 0.5 if row["said"] == 0.5 else float(row["said"] == row[against])
        hits["all"].append(hit)
        hits[str(row[group])].append(hit)
    rank = {name: i for i, name in enumerate(order or ())}
    keys = sorted(hits, key=lambda k: (k != "all", rank.get(k, len(rank)), -len(hits[k]), k))
    return {k: (len(hits[k]), float(np.mean(hits[k]))) for k in keys}


def format_breakdown(title: str, table: dict[str, tuple]) -> str:
    lines = [title]
    lines += [f"  {name:<20} {n:>5} pairs  {acc:.3f}" for name, (n, acc) in table.items()]
    return "\n".join(lines)


def rm_rows(stage_dir: str, batch_size: int = 16) -> list[dict]:
    """The RM stage's held-out pairs scored by its newest checkpoint, with the judge's label
    ('ai') and the truth."""
    data_dir = os.path.join(stage_dir, "data")
    with open(os.path.join(data_dir, "prepared.json")) as f:
        table = json.load(f)["labels_table"]
    with open(os.path.join(data_dir, "heldout.json")) as f:
        items = {item["id"]: item for item in json.load(f)}
    step_dir, config = stage_config(stage_dir)
    model, params = load_stage(stage_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(stage_tokenizer_dir(step_dir))
    pipeline = Pipeline(os.path.join(data_dir, "build"), "heldout", tokenizer, batch_size,
                        int(config.get("max_length", 256)), 0, shuffle=False,
                        num_frames=model.config.num_frames)
    weight = float(config.get("likelihood_weight", 0.0))
    score = jax.jit(lambda p, b: pair_rewards(model, {"params": p}, b, weight))
    keys = ("input_ids", "attention_mask", "response_mask", "frames", "has_video")
    rows = []
    for record, said, _ in heldout_verdicts(
            lambda batch: score(params, {k: batch[k] for k in keys if k in batch}), pipeline):
        item, labels = items[record["id"]], table[record["id"]]
        if labels["truth"] is None or not item.get("true_scores"):
            continue
        rows.append({"type": question_type(item), "gap": gap_bin(item["true_scores"]),
                     "said": said, "truth": labels["truth"], "ai": labels["ai"]})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preferences", help="a preference JSON with true_preference/true_scores")
    parser.add_argument("--rm", nargs="*", default=[], help="RM stage directories to score")
    args = parser.parse_args(argv)
    with open(args.preferences) as f:
        rows = judged_rows(json.load(f))
    if not rows:
        raise SystemExit(f"{args.preferences}: no pair carries true_preference and true_scores")
    for row, name in zip(rows, confidence_bins(rows)):
        row["confidence_bin"] = name
    print(f"judge: {args.preferences}")
    gaps = [name for _, _, name in GAP_BINS]
    quarters = ["q1", "q2", "q3", "q4"]
    for group, order in (("type", None), ("gap", gaps), ("confidence_bin", quarters)):
        print(format_breakdown(f" against the truth, by {group}",
                               breakdown(rows, group, order=order)))
    for stage in args.rm:
        held = rm_rows(stage)
        print(f"reward model: {stage} ({len(held)} held-out pairs with a truth)")
        for group, order in (("type", None), ("gap", gaps)):
            print(format_breakdown(f" against the truth, by {group}",
                                   breakdown(held, group, order=order)))
        print(format_breakdown(" against the AI labels, by type", breakdown(held, "type", "ai")))


if __name__ == "__main__":
    main()
