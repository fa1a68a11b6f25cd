"""What a context of clip answers could add to the judge, read perfectly.

For the judged pairs of a feedback run (W/feedback/judged.jsonl) whose question is about a
shape's colour over time or about when it appears or changes colour, the SFT model answers
"What colour is the X?" of each clip of the video (greedy, at its own frame count, the frames
cut as the feedback stage cuts them). From those clip answers alone a perfect reader takes an
answer to the question:

- colour at the start: the colour of the first clip that shows the shape;
- colour at the end: the colour of the last clip;
- when it appears: the first clip that shows the shape;
- when it changes colour: the first clip whose colour differs from the clip before.

It prefers the one answer of the pair that says the same, and keeps the no-context judge's
verdict where both or neither do. Its agreement with the truth on the decisive pairs, against
the no-context judge's and the run's judge with its context on the same pairs, is an upper bound
on what such a context could give this judge (the truth only grades: every verdict is made
first). The world's start, middle and end are its three clips.

    python -m rlaif_jax.eval.context_bound WORKDIR [--types colour_start,colour_end] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

import numpy as np

from rlaif_jax.data.synthetic import generate as world_files
from rlaif_jax.data.synthetic import scorer, text, world
from rlaif_jax.eval.clip_probe import NUM_CLIPS, Answerer, colour_question, load_probe, named
from rlaif_jax.eval.stats import mean_and_se

READABLE_TYPES = ("colour_start", "colour_end", "appear_when", "change_when")


def clip_derived_answer(kind: str, clip_colours: Sequence[Optional[str]]
                        ) -> Optional[tuple[str, str]]:
    """('colour', c) or ('time', start|middle|end): what the clip colours (None where a clip
    does not show the shape, or names no single colour) say to a question of type `kind`;
    None when they say nothing."""
    shown = [c for c, colour in enumerate(clip_colours) if colour is not None]
    if not shown or kind not in READABLE_TYPES:
        return None
    if kind == "colour_start":
        return "colour", clip_colours[shown[0]]
    if kind == "colour_end":
        return ("colour", clip_colours[-1]) if clip_colours[-1] is not None else None
    if kind == "appear_when":
        return "time", world.TIME_BUCKETS[shown[0]]
    changed = [c for c in shown[1:] if clip_colours[c - 1] not in (None, clip_colours[c])]
    return ("time", world.TIME_BUCKETS[changed[0]]) if changed else None


def says(answer: str, derived: tuple[str, str]) -> bool:
    kind, value = derived
    named_values = scorer.named_colours(answer) if kind == "colour" else scorer.named_times(answer)
    return named_values == [value]


def bound(rows: Sequence[dict], video_of: dict, answer: Answerer,
          types: Sequence[str] = READABLE_TYPES) -> list[dict]:
    """One record per decisive judged pair whose question type is in `types`: hits (0 / 1) of
    the perfect reader, the no-context judge and the judge with its context. `video_of` maps a
    pair's id to its video name."""
    pairs = [r for r in rows if r["question_type"] in types and r.get("preference") is not None
             and r.get("preference_no_context") is not None
             and r["true_scores"][0] != r["true_scores"][1]]
    # The question each pair's clips are asked: "What colour is the X?" of the pair's shape.
    clip_asks = {r["id"]: [((video_of[r["id"]], clip),
                            colour_question(text.parse_question(r["question"]).get("shape")))
                           for clip in range(NUM_CLIPS)] for r in pairs}
    asks = sorted({ask for pair_asks in clip_asks.values() for ask in pair_asks})
    answers = dict(zip(asks, answer(asks)))
    records = []
    for r in pairs:
        colours = [named(answers[ask]) for ask in clip_asks[r["id"]]]
        derived = clip_derived_answer(r["question_type"], colours)
        verdict = r["preference_no_context"]
        if derived is not None:
            match = [says(r["output_1"], derived), says(r["output_2"], derived)]
            if match[0] != match[1]:
                verdict = 1 if match[0] else 2
        better = 1 if r["true_scores"][0] > r["true_scores"][1] else 2
        records.append({"id": r["id"], "question_type": r["question_type"],
                         "clip_colours": colours, "derived": derived,
                         "reader": float(verdict == better),
                         "no_context": float(r["preference_no_context"] == better),
                         "with_context": float(r["preference"] == better)})
    return records


def summarize(records: Sequence[dict]) -> list[dict]:
    """Rows by question type and over all: n, the three agreements, and the paired gains over
    the no-context judge with their standard errors sqrt(var(gain) / n)."""
    if not records:
        return []
    groups = {"all": list(records)}
    for r in records:
        groups.setdefault(r["question_type"], []).append(r)
    rows = []
    for kind, group in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        hits = {k: np.array([r[k] for r in group]) for k in ("reader", "no_context",
                                                             "with_context")}
        row = {"type": kind, "n": len(group)}
        row.update({k: float(v.mean()) for k, v in hits.items()})
        for k in ("reader", "with_context"):
            row[f"{k}_gain"], row[f"{k}_gain_se"] = mean_and_se(hits[k] - hits["no_context"])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| question | decisive pairs | perfect reader | no context | the judge with its context"
             " | reader - no context |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['n']} | {r['reader']:.3f} | {r['no_context']:.3f} | "
                     f"{r['with_context']:.3f} | {r['reader_gain']:+.3f} +- "
                     f"{r['reader_gain_se']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a main-job workdir (its sft stage, feedback stage and "
                        "synthetic world)")
    parser.add_argument("--types", default=",".join(READABLE_TYPES),
                        help=f"question types the reader reads (of {','.join(READABLE_TYPES)})")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--json", default="", help="also write the rows and records here")
    args = parser.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    unknown = sorted(set(types) - set(READABLE_TYPES))
    if unknown:
        parser.error(f"--types: {unknown} are not among {READABLE_TYPES}")
    judged_path = os.path.join(args.workdir, "feedback", "judged.jsonl")
    if not os.path.isfile(judged_path):
        parser.error(f"{judged_path} does not exist: run the feedback stage first")
    with open(judged_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["question_type"] in types]
    video_of = {r["id"]: world_files.video_name(r["images"]) for r in rows}
    setup = load_probe(os.path.join(args.workdir, "sft"), names=sorted(set(video_of.values())))
    records = bound(rows, video_of, setup.answerer(args.batch_size), types)
    table = summarize(records)
    if table:
        print(f"{len(records)} decisive pairs of {judged_path}, clips read for "
              f"{', '.join(types)} ({setup.step_dir}):\n" + format_table(table), flush=True)
    else:
        print(f"no decisive pairs of the types {', '.join(types)} in {judged_path}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": table, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
