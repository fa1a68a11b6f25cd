"""Held-out video QA on the synthetic world: greedy answers graded by the world's scorer.

For every question of an evaluation split (a `qa` build, e.g. of eval_qa.json and
eval_generic.json), the model answers by greedy decoding (`sampling.generate`) and
`synthetic.score_answer` grades the answer against the video's truth. Reported:

- `exact_match`: share of short-answer questions answered right (`Score.correct`), and
  `exact_match/<type>` per question type (`count`, `colour`, `motion`, `before_after`, ...):
  which facts the model reads from the video and which it guesses;
- `chance`: the expected exact match of a uniform guess among each question's possible answers
  (6 colours, 5 motions, 3 counts, 3 shapes, 3 times, the video's events, before/after);
- per-axis means of the scorer (`correctness`, `temporal`) on short questions, and on
  descriptions (`describe_correctness`, `describe_detail`, `describe_temporal`);
- `n_qa` and `n_describe`: how many short questions and descriptions were graded (the n of
  each mean's standard error);
- with `blind=True` the same with every item's video swapped for another video's (a fixed
  derangement of the split's videos): what the text alone gives.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from rlaif_jax.data.pipeline import Pipeline
from rlaif_jax.data.synthetic import load_truth, score_answer, world
from rlaif_jax.data.synthetic import text as synthetic_text
from rlaif_jax.sampling.generate import SamplingConfig, generate


@dataclasses.dataclass
class EvalItem:
    video_name: str
    question: str
    answer: str  # the reference answer
    spec: dict  # the parsed question
    input_ids: np.ndarray  # [L] left-padded prompt ("... ASSISTANT:")
    attention_mask: np.ndarray
    video: int  # the build's video id
    frames: np.ndarray  # [T, S, S, 3] uint8


def load_items(pipeline, limit: int = 0) -> list[EvalItem]:
    """The split's items in order (a Pipeline of a `qa` build with shuffle=False, read whole by
    every process); `limit` > 0 keeps the first `limit`."""
    items: list[EvalItem] = []
    for step in range(pipeline.steps_per_epoch):
        batch = pipeline.batch(step)
        for row in np.flatnonzero(batch["valid"]):
            record = pipeline.record(int(batch["index"][row]))
            items.append(EvalItem(
                video_name=record["video_name"], question=record["question"],
                answer=record["answer"], spec=synthetic_text.parse_question(record["question"]),
                input_ids=batch["input_ids"][row], attention_mask=batch["attention_mask"][row],
                video=int(record["video"]), frames=batch["frames"][row]))
            if limit and len(items) >= limit:
                return items
    return items


def is_short(item: EvalItem, truth: dict) -> bool:
    return item.spec["type"] in synthetic_text.SHORT_TYPES and any(
        item.spec == s for s in synthetic_text.answerable_specs(truth))


def num_choices(spec: dict, truth: dict) -> int:
    """How many answers a short question could be given (for the chance level)."""
    kind = spec["type"]
    if kind in ("colour", "colour_start", "colour_end"):
        return len(world.COLOURS)
    if kind == "motion":
        return len(world.MOTIONS)
    if kind == "count":
        return 3  # one to three shapes
    if kind == "shape_of_colour":
        return len(world.SHAPES)
    if kind in ("appear_when", "change_when"):
        return len(synthetic_text.TIME_PHRASES)
    if kind == "first_event":
        return len(truth["events"])
    if kind == "before_after":
        return 2
    raise ValueError(f"not a short question: {spec}")


def derangement_of_videos(items: list[EvalItem]) -> dict[int, int]:
    """video id -> another video id of the split (a cyclic shift of the sorted ids)."""
    videos = sorted({item.video for item in items})
    if len(videos) < 2:
        raise ValueError("a blind evaluation needs at least two videos")
    return {v: videos[(i + 1) % len(videos)] for i, v in enumerate(videos)}


def answer_items(model, variables, items: list[EvalItem], tokenizer, batch_size: int,
                 max_new_tokens: int, mesh=None, rules=None, blind: bool = False,
                 prompt_bucket: int = 64, seed: int = 0) -> list[str]:
    """Greedy answers to every item (blind: each with another video's frames)."""
    frames_of = {item.video: item.frames for item in items}
    swap = derangement_of_videos(items) if blind else {v: v for v in frames_of}
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, prompt_bucket=prompt_bucket)
    kwargs = {} if mesh is None else dict(mesh=mesh, rules=rules)
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static shapes
        batch = {"input_ids": np.stack([r.input_ids for r in rows]),
                 "attention_mask": np.stack([r.attention_mask for r in rows]),
                 "frames": np.stack([frames_of[swap[r.video]] for r in rows]),
                 "has_video": np.ones(len(rows), bool)}
        out = generate(model, variables, batch, jax.random.PRNGKey(seed), sampling, **kwargs)
        tokens, lengths, has_eos = jax.device_get((out.tokens, out.lengths, out.has_eos))
        for row in range(len(chunk)):
            keep = tokens[row, :int(lengths[row]) - int(bool(has_eos[row]))]
            answers.append(tokenizer.decode(keep.tolist(), skip_special_tokens=True).strip())
    return answers


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def score_items(items: list[EvalItem], answers: list[str], truths: dict, prefix: str = "",
                ) -> dict[str, float]:
    """Scorer means over the items (keys as in the module docstring, each with `prefix`)."""
    short, described, by_type = [], [], {}
    for item, answer in zip(items, answers):
        truth = truths[item.video_name]
        score = score_answer(truth, item.spec, answer)
        if is_short(item, truth):
            short.append(score)
            by_type.setdefault(item.spec["type"], []).append(score.correct)
        else:
            described.append(score)
    out = {}
    if short:
        out.update({"n_qa": float(len(short)), "exact_match": _mean([s.correct for s in short]),
                    "correctness": _mean([s.correctness for s in short]),
                    "temporal": _mean([s.temporal for s in short])})
        out.update({f"exact_match/{kind}": _mean(hits) for kind, hits in sorted(by_type.items())})
    if described:
        out.update({"n_describe": float(len(described)),
                    "describe_correctness": _mean([s.correctness for s in described]),
                    "describe_detail": _mean([s.detail for s in described]),
                    "describe_temporal": _mean([s.temporal for s in described]),
                    "describe_exact": _mean([s.correct for s in described])})
    return {prefix + k: v for k, v in out.items()}


def chance_level(items: list[EvalItem], truths: dict) -> float:
    shorts = [(i, truths[i.video_name]) for i in items if is_short(i, truths[i.video_name])]
    return _mean([1.0 / num_choices(i.spec, t) for i, t in shorts])


def evaluate(model, variables, items: list[EvalItem], truths: dict, tokenizer, batch_size: int,
             max_new_tokens: int, mesh=None, rules=None, blind: bool = True,
             examples: Optional[int] = 0) -> tuple[dict[str, float], list[dict]]:
    """(metrics, the first `examples` answers as dicts, None: all); metrics namespaced
    'eval/...'."""
    answers = answer_items(model, variables, items, tokenizer, batch_size, max_new_tokens,
                           mesh, rules)
    metrics = score_items(items, answers, truths, "eval/")
    metrics["eval/chance"] = chance_level(items, truths)
    if blind:
        blind_answers = answer_items(model, variables, items, tokenizer, batch_size,
                                     max_new_tokens, mesh, rules, blind=True)
        metrics.update({k + "_blind": v for k, v in
                        score_items(items, blind_answers, truths, "eval/").items()})
    shown = [{"video": i.video_name, "question": i.question, "reference": i.answer,
              "answer": a} for i, a in zip(items[:examples], answers[:examples])]
    return metrics, shown


class HeldOutQA:
    """Held-out QA of a synthetic world for any variables of one model: the items of the eval
    build's `splits` ((split, file) pairs; at most `num_qa` of the 'qa' split and `num_describe`
    of the others, 0 = all), read once; each call answers and grades them (`evaluate`)."""

    def __init__(self, model, world_dir: str, eval_build: str, splits, tokenizer,
                 batch_size: int, max_length: int, max_new_tokens: int, num_qa: int,
                 num_describe: int, mesh=None, rules=None, examples: Optional[int] = 8):
        self.model, self.tokenizer, self.mesh, self.rules = model, tokenizer, mesh, rules
        self.batch_size, self.max_new_tokens, self.examples = batch_size, max_new_tokens, examples
        self.truths = load_truth(world_dir)
        self.items = []
        for split, _ in splits:
            # Every process reads the whole split: generate() places the full batch on the mesh.
            pipeline = Pipeline(eval_build, split, tokenizer, batch_size, max_length,
                                shuffle=False, process_index=0, process_count=1)
            self.items += load_items(pipeline, num_qa if split == "qa" else num_describe)

    def __call__(self, variables, blind: bool = False) -> tuple[dict[str, float], list[dict]]:
        return evaluate(self.model, variables, self.items, self.truths, self.tokenizer,
                        self.batch_size, self.max_new_tokens, mesh=self.mesh, rules=self.rules,
                        blind=blind, examples=self.examples)
