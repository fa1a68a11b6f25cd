"""Does a video LLM read a context of clip answers, and does its own context help it?

The feedback stage's `question` context asks the prompt's question of each clip
(`prompts.clip_question`) and puts the clip answers in front of the question
(`prompts.question_with_context`). This probe asks every short question of the synthetic world's
eval videos (those answered by a few words; questions about the order of events are answered
by clip descriptions and left out) four ways, greedy, at the model's own frame count, graded
by the world's scorer:

- `none`: the question alone;
- `true`: after the true clip answers (`text.clip_answers`): can the model read a context?
- `own`: after the model's own clip answers, as the feedback stage builds them: does its
  context carry more than it sees in the whole video?
- `wrong`: after wrong clip answers (`text.wrong_clip_answer`): does it copy the context?

Rows by question type, the time-localised types together and all, with n, each mode's accuracy
and the paired gain of `own` over `none` with its standard error sqrt(var(own - none) / n).

    python -m rlaif_jax.eval.context_probe WORKDIR/sft [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import numpy as np

from rlaif_jax.data import prompts
from rlaif_jax.data.synthetic import scorer, text, world
from rlaif_jax.eval.clip_probe import Answerer, load_probe
from rlaif_jax.eval.stats import mean_and_se

MODES = ("none", "true", "own", "wrong")
TIME_LOCALISED = "time-localised"


def probed_specs(truth: dict) -> list[dict]:
    """The video's short questions whose clip answers are a few words."""
    return [s for s in text.answerable_specs(truth)
            if s["type"] in text.SHORT_TYPES and s["type"] not in text.DESCRIBED_IN_CLIPS]


def probe(truths: dict, answer: Answerer, seed: int = 0) -> list[dict]:
    """One record per (video, question): its type and a hit (0 / 1) per mode."""
    rng = np.random.default_rng(seed)
    asked = [(name, spec) for name, truth in sorted(truths.items())
             for spec in probed_specs(truth)]
    clip_asks = [((name, clip), prompts.clip_question(text.question_text(spec)))
                 for name, spec in asked for clip in range(world.NUM_CLIPS)]
    own = answer(clip_asks)
    contexts: dict[str, list[Optional[str]]] = {mode: [] for mode in MODES}
    for index, (name, spec) in enumerate(asked):
        truth = truths[name]
        ranges = world.clip_frame_ranges(truth["num_frames"], world.NUM_CLIPS)
        contexts["none"].append(None)
        contexts["true"].append(prompts.join_clip_descriptions(text.clip_answers(truth, spec)))
        contexts["own"].append(prompts.join_clip_descriptions(
            own[world.NUM_CLIPS * index:world.NUM_CLIPS * (index + 1)]))
        contexts["wrong"].append(prompts.join_clip_descriptions(
            [text.wrong_clip_answer(truth, spec, frames, rng) for frames in ranges]))
    records = [{"video": name, "type": spec["type"], "question": text.question_text(spec)}
               for name, spec in asked]
    for mode in MODES:
        answers = answer([((name, None), prompts.question_with_context(
            text.question_text(spec), context))
            for (name, spec), context in zip(asked, contexts[mode])])
        for record, (name, spec), reply in zip(records, asked, answers):
            record[mode] = float(scorer.score_answer(truths[name], spec, reply).correct)
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Rows by question type, then the time-localised types together, then all."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["type"], []).append(r)
    keys = sorted(groups)
    groups[TIME_LOCALISED] = [r for r in records if r["type"] in text.TEMPORAL_TYPES]
    groups["all"] = list(records)
    rows = []
    for key in keys + [TIME_LOCALISED, "all"]:
        group = groups[key]
        if not group:
            continue
        row = {"type": key, "n": len(group)}
        for mode in MODES:
            row[mode] = float(np.mean([r[mode] for r in group]))
        row["gain_own"], row["gain_own_se"] = mean_and_se([r["own"] - r["none"] for r in group])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| question | n | no context | true clip answers | own clip answers | wrong clip "
             "answers | own - none |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['n']} | " + " | ".join(f"{r[m]:.3f}" for m in MODES)
                     + f" | {r['gain_own']:+.3f} +- {r['gain_own_se']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", help="a stage or step directory of a video LLM (e.g. WORKDIR/sft)")
    parser.add_argument("--world", default="", help="the synthetic world (default: the "
                        "stage's WORKDIR/data/world)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--json", default="", help="also write the rows and records here")
    args = parser.parse_args(argv)
    setup = load_probe(args.stage, args.world)
    records = probe(setup.truths, setup.answerer(args.batch_size))
    rows = summarize(records)
    print(f"{len(setup.truths)} eval videos, {setup.num_frames} frames ({setup.step_dir}):\n"
          + format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
