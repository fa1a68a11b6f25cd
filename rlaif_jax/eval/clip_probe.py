"""Whole video or one clip: how well a video LLM reads a time-localised fact.

Whole-video spatio-temporal pooling blends a shape's colours over time; the tokens of a short
clip do not. This probe measures what that costs, for every shape of the synthetic world's eval
videos, greedy answers at the model's own frame count, graded by the world's scorer:

- colour_start: "What colour is the X at the start?" of the whole video, against "What colour is
  the X?" of the clip where X first shows (the frames cut into 3 clips as the feedback stage
  cuts them, each resampled to the model's frame count);
- colour_end: "... at the end?" of the whole video, against "What colour is the X?" of the last
  clip;
- change_when (shapes that change colour): "When does the X change colour?" of the whole video,
  against the clip answers read in order (the change is in the first clip whose colour differs
  from the clip before it).

Rows split shapes that change colour from those that do not; each row has n, both accuracies
and the paired gain with its standard error sqrt(var(clip - whole) / n). The world's start,
middle and end are its three clips, so its time phrases line up with the clip boundaries: a
favourable case for clips, which a real video's events need not be.

    python -m rlaif_jax.eval.clip_probe WORKDIR/sft [--frames N] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
import transformers

from rlaif_jax.data import conversation
from rlaif_jax.data.synthetic import generate as world_files
from rlaif_jax.data.synthetic import scorer, text, world
from rlaif_jax.data.video import clip_frames, load_frames
from rlaif_jax.engine.pretrained import load_stage, stage_config, stage_tokenizer_dir
from rlaif_jax.eval.stats import mean_and_se
from rlaif_jax.eval.synthetic_qa import EvalItem, answer_items
from rlaif_jax.workdir.layout import workdir_of
from rlaif_jax.workdir.layout import world_dir as world_dir_of

NUM_CLIPS = world.NUM_CLIPS
# (frames key, question): the frames key is (video name, None) for the whole video or
# (video name, clip index); the answerer returns one greedy answer per question.
Answerer = Callable[[Sequence[tuple[tuple[str, Optional[int]], str]]], list[str]]


def colour_question(shape: str, when: str = "") -> str:
    spec = {"type": f"colour_{when}" if when else "colour", "shape": shape}
    return text.question_text(spec)


def named(answer: str) -> Optional[str]:
    colours = scorer.named_colours(answer)
    return colours[0] if len(colours) == 1 else None


def probe(truths: dict, answer: Answerer) -> list[dict]:
    """One record per (video, shape, type): the whole-video and the clip route's hit (0 / 1)."""
    asks: list[tuple[tuple[str, Optional[int]], str]] = []
    for name, truth in sorted(truths.items()):
        frames = truth["num_frames"]
        ranges = world.clip_frame_ranges(frames, NUM_CLIPS)
        for obj in truth["objects"]:
            shape = obj["shape"]
            asks += [((name, None), colour_question(shape, "start")),
                     ((name, None), colour_question(shape, "end"))]
            if obj["change_frame"] is not None:
                asks.append(((name, None), text.question_text(
                    {"type": "change_when", "shape": shape})))
            for clip, clip_range in enumerate(ranges):
                if clip_range[-1] >= obj["appear_frame"]:
                    asks.append(((name, clip), colour_question(shape)))
    answers = dict(zip(asks, answer(asks)))
    records = []
    for name, truth in sorted(truths.items()):
        frames = truth["num_frames"]
        ranges = world.clip_frame_ranges(frames, NUM_CLIPS)
        for obj in truth["objects"]:
            shape, changes = obj["shape"], obj["change_frame"] is not None
            first_clip = world.clip_of_frame(obj["appear_frame"], frames)
            clip_colours = {clip: named(answers[((name, clip), colour_question(shape))])
                            for clip in range(first_clip, len(ranges))}
            start, end = world.colour_at(obj, obj["appear_frame"]), world.colour_at(obj, frames - 1)
            base = {"video": name, "shape": shape, "changes_colour": changes}
            records.append(dict(base, type="colour_start", truth=start, whole=float(
                named(answers[((name, None), colour_question(shape, "start"))]) == start),
                clip=float(clip_colours[first_clip] == start)))
            records.append(dict(base, type="colour_end", truth=end, whole=float(
                named(answers[((name, None), colour_question(shape, "end"))]) == end),
                clip=float(clip_colours[len(ranges) - 1] == end)))
            if changes:
                bucket = world.time_bucket(obj["change_frame"], frames)
                question = text.question_text({"type": "change_when", "shape": shape})
                whole = scorer.score_answer(truth, question, answers[((name, None), question)])
                said = next((world.TIME_BUCKETS[c] for c in range(first_clip + 1, len(ranges))
                             if clip_colours[c] != clip_colours[c - 1]), None)
                records.append(dict(base, type="change_when", truth=bucket,
                                    whole=float(whole.correct), clip=float(said == bucket)))
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Rows by (type, changes colour): n, accuracies, paired gain (clip - whole) and its SE."""
    rows = []
    for kind in ("colour_start", "colour_end", "change_when"):
        for changes in (True, False):
            group = [r for r in records if r["type"] == kind and r["changes_colour"] == changes]
            if not group:
                continue
            whole = np.array([r["whole"] for r in group])
            clip = np.array([r["clip"] for r in group])
            gain, se = mean_and_se(clip - whole)
            rows.append({"type": kind, "changes_colour": changes, "n": len(group),
                         "whole": float(whole.mean()), "clip": float(clip.mean()),
                         "gain": gain, "gain_se": se})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| question | shapes | n | whole video | clip | gain (clip - whole) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {'change colour' if r['changes_colour'] else 'keep colour'}"
                     f" | {r['n']} | {r['whole']:.3f} | {r['clip']:.3f} | "
                     f"{r['gain']:+.3f} +- {r['gain_se']:.3f} |")
    return "\n".join(lines)


def model_answerer(model, params, tokenizer, videos: dict, batch_size: int = 32,
                   max_new_tokens: int = 16) -> Answerer:
    """Greedy answers of a video LLM; `videos` maps a video name to its frames [T, S, S, 3]."""
    clips = {name: clip_frames(frames[None], NUM_CLIPS) for name, frames in videos.items()}

    def answer(asks):
        keys = sorted({key for key, _ in asks}, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        video_id = {key: i for i, key in enumerate(keys)}
        prompts = [conversation.tokenize_prompt(conversation.video_question(q), tokenizer)
                   for _, q in asks]
        input_ids, mask = conversation.left_pad(prompts, tokenizer.pad_token_id or 0)
        items = []
        for row, (key, question) in enumerate(asks):
            name, clip = key
            frames = videos[name] if clip is None else clips[name][clip]
            items.append(EvalItem(video_name=name, question=question, answer="", spec={},
                                  input_ids=input_ids[row], attention_mask=mask[row],
                                  video=video_id[key], frames=frames))
        return answer_items(model, {"params": params}, items, tokenizer, batch_size,
                            max_new_tokens)

    return answer


@dataclasses.dataclass
class ProbeSetup:
    """A stage's model and the synthetic world's eval videos it is probed on."""
    step_dir: str
    model: object
    params: dict
    tokenizer: object
    truths: dict  # eval video name -> truth
    videos: dict  # eval video name -> frames [T, S, S, 3] at the model's frame count

    @property
    def num_frames(self) -> int:
        return self.model.config.num_frames

    def answerer(self, batch_size: int = 32) -> Answerer:
        return model_answerer(self.model, self.params, self.tokenizer, self.videos, batch_size)


def load_probe(stage: str, world: str = "", frames: int = 0,
               names: Optional[Sequence[str]] = None) -> ProbeSetup:
    """The model of a stage or step directory (at `frames` frames; 0: its own) and videos of
    its workdir's world (or of `world`): those named, or the eval videos."""
    step_dir, _ = stage_config(stage)
    names = None if names is None else set(names)
    world_dir = world or world_dir_of(workdir_of(step_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(stage_tokenizer_dir(step_dir))
    overrides = {"num_frames": frames} if frames else {}
    model, params = load_stage(step_dir, tokenizer=tokenizer, **overrides)
    num_frames, size = model.config.num_frames, model.config.vision.image_size
    truths = {name: truth for name, truth in world_files.load_truth(world_dir).items()
              if (name in names if names is not None else name.startswith("eval_"))}
    videos = {name: load_frames(os.path.join(world_dir, world_files.video_path(name)),
                                num_frames, size) for name in sorted(truths)}
    return ProbeSetup(step_dir, model, params, tokenizer, truths, videos)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", help="a stage or step directory of a video LLM (e.g. WORKDIR/sft)")
    parser.add_argument("--world", default="", help="the synthetic world (default: the "
                        "stage's WORKDIR/data/world)")
    parser.add_argument("--frames", type=int, default=0, help="0: the model's own frame count")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--json", default="", help="also write the rows and records here")
    args = parser.parse_args(argv)
    setup = load_probe(args.stage, args.world, args.frames)
    records = probe(setup.truths, setup.answerer(args.batch_size))
    rows = summarize(records)
    print(f"{len(setup.truths)} eval videos, {setup.num_frames} frames, {NUM_CLIPS} clips "
          f"({setup.step_dir}):\n" + format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
