"""Stage 2: context-aware AI feedback. The SFT policy samples, describes and judges.

For each (video, question) of the prompt set:

1. two answers are sampled from the policy (temperature sampling, one prefill shared by both);
2. the context: the video's frames are cut into `num_clips` clips (each resampled to the model's
   frame count, as the SFT data shows clips), the policy describes each clip with
   `prompts.context_prompt()` (greedy), and the descriptions are joined
   (`prompts.join_clip_descriptions`); one context per video, reused by its questions;
3. the judge: the same policy reads the video, the question, both answers, the context and the
   principles (`prompts.judge_prompt`), and one forward pass gives its next-token log-probs of
   two choices: the labels `prompts.JUDGE_CHOICES` (`judge_reply='label'`, the paper's), or, when
   the judge is asked to restate the better answer (`'restate'`), the two answers' tokens where
   they first differ, after their common start. Asked in both orders, P(answer 1 is better) is
   the mean of P(answer 1's choice) in order (1, 2) and in order (2, 1), which cancels a position
   bias. Pairs whose margin |2P - 1| is under `margin` are dropped, as are identical answers.

The video is encoded once per batch and its tokens reused by the sampler and both judge orders.
Output: WORKDIR/feedback/preferences.json in the reference's preference format plus the judge's
`confidence` (P of the preferred answer) and, on the synthetic world, the scorer's
`true_preference`. Work is split across processes (each takes its slice of every batch and
writes its own part file, one JSON line per finished prompt), so a rerun after a crash skips
what is done. The no-context ablation (`context='none'`) judges without a description; with
context the run also measures the no-context judge on the same pairs, so the two agreements with
the truth are a paired comparison.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rlaif_jax.data import conversation, prompts
from rlaif_jax.data.video import sample_indices
from rlaif_jax.parallel import sharding as su
from rlaif_jax.sampling.generate import SamplingConfig, bucket_length, decoder_for, generate

CONTEXT_MODES = ("clips", "none")


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class FeedbackSettings:
    answer_sampling: SamplingConfig  # num_samples is forced to 2
    context_sampling: SamplingConfig  # num_samples is forced to 1
    num_clips: int = 3
    context: str = "clips"  # 'clips' or 'none' (the ablation)
    measure_no_context: bool = True  # with context: also judge without it, for the metrics
    margin: float = 0.0  # drop pairs with |P(1) - P(2)| below this (applied when writing)
    judge_reply: str = "label"  # prompts.JUDGE_REPLIES: a label, or the better answer restated
    max_judge_length: int = 2048  # longer judge prompts are skipped and counted
    prompt_bucket: int = 64

    def __post_init__(self):
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"context={self.context!r}: expected one of {CONTEXT_MODES}")
        if self.judge_reply not in prompts.JUDGE_REPLIES:
            raise ValueError(f"judge_reply={self.judge_reply!r}: expected one of "
                             f"{prompts.JUDGE_REPLIES}")
        if self.num_clips < 1:
            raise ValueError(f"num_clips={self.num_clips}: must be >= 1")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin={self.margin}: must be in [0, 1)")
        object.__setattr__(self, "answer_sampling", self.answer_sampling.replace(num_samples=2))
        object.__setattr__(self, "context_sampling",
                           self.context_sampling.replace(num_samples=1))


# ---------------------------------------------------------------------------------------------
# Pieces


def clip_frames(frames: np.ndarray, num_clips: int) -> np.ndarray:
    """[B, T, ...] -> [B * num_clips, T, ...]: the frames cut into consecutive clips
    (`np.array_split`, as the synthetic world cuts them), each resampled to T frames by linspace
    (a short clip repeats frames), so the model sees a clip as it sees a video."""
    batch, num_frames = frames.shape[:2]
    parts = np.array_split(np.arange(num_frames), num_clips)
    if any(len(p) == 0 for p in parts):
        raise ValueError(f"cannot cut {num_frames} frames into {num_clips} clips")
    clips = [frames[:, part[sample_indices(len(part), num_frames)]] for part in parts]
    return np.stack(clips, axis=1).reshape((batch * num_clips,) + frames.shape[1:])


def decode_texts(tokens: np.ndarray, lengths: np.ndarray, has_eos: np.ndarray, tokenizer
                 ) -> list[str]:
    """Generated rows -> text (the EOS and anything after it dropped)."""
    texts = []
    for row, length, eos in zip(np.asarray(tokens), np.asarray(lengths), np.asarray(has_eos)):
        keep = row[: int(length) - 1] if eos else row[: int(length)]
        texts.append(tokenizer.decode(keep.tolist(), skip_special_tokens=True).strip())
    return texts


def question_of(turn: dict) -> str:
    """The question text of a human turn (without the `<image>` placeholder line)."""
    return turn["value"].replace(prompts.IMAGE_TOKEN, "").strip()


def _left_pad(rows: Sequence[np.ndarray], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    return ids, mask


def _last_logits(model, variables, input_ids, attention_mask, video_tokens, has_video):
    """Next-token logits [B, V] after left-padded prompts (one forward, no cache)."""
    if hasattr(model, "encode_video"):
        out = model.apply(variables, input_ids, attention_mask, video_tokens=video_tokens,
                          has_video=has_video, compute_logits=False)
        return model.apply(variables, out.last_hidden_state[:, -1:], method="logits")[:, 0]
    from rlaif_jax.models.llama import Llama
    out = model.apply(variables, input_ids=input_ids, attention_mask=attention_mask,
                      compute_logits=False)
    return model.apply(variables, out.last_hidden_state[:, -1:], method=Llama.logits)[:, 0]


def _choice_logprobs(model, variables, input_ids, attention_mask, video_tokens, has_video,
                     choice_ids):
    """log P(choice) [B, 2] of each row's two next-token choices `choice_ids` [B, 2],
    renormalised over the two."""
    logits = _last_logits(model, variables, input_ids, attention_mask, video_tokens, has_video)
    picked = jnp.take_along_axis(logits.astype(jnp.float32), choice_ids, axis=1)
    return jax.nn.log_softmax(picked, axis=-1)


_choice_logprobs_jit = jax.jit(_choice_logprobs, static_argnames=("model",))


def restated_choice(human: dict, first: str, second: str, tokenizer
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, the two choice ids) of a judge asked to restate the better answer: the judge
    prompt followed by the answers' common first tokens, and each answer's token where they
    first differ (its end-of-turn token if it is the shorter). Answers with the same tokens give
    the same choice twice, which reads as a tie."""
    rows = conversation.tokenize_conversations(
        [[human, {"from": "gpt", "value": answer}] for answer in (first, second)], tokenizer)
    a, b = rows[0].input_ids, rows[1].input_ids
    common = min(len(a), len(b))
    differ = np.flatnonzero(a[:common] != b[:common])
    split = int(differ[0]) if len(differ) else common - 1
    return a[:split], np.array([a[split], b[split]], np.int32)


# ---------------------------------------------------------------------------------------------
# The AI feedback engine


class AIFeedback:
    """Samples answer pairs, writes contexts and judges, for batches of DESIGN.md's format.

    model: the policy (a VideoLLM, or a text LLaMA for text-only prompts); variables placed on
    `mesh` (or on one device without a mesh). Batches must have a multiple of the mesh's batch
    shards as rows.
    """

    def __init__(self, model, variables, tokenizer, settings: FeedbackSettings, mesh=None,
                 rules=su.DEFAULT_RULES):
        self.model, self.variables, self.tokenizer = model, variables, tokenizer
        self.settings, self.mesh, self.rules = settings, mesh, rules
        self.decoder = decoder_for(model)
        self.vision = getattr(self.decoder, "has_vision", False)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = tokenizer.eos_token_id
        s = settings
        self.answer_sampling = s.answer_sampling.replace(eos_token_id=eos, pad_token_id=self.pad)
        self.context_sampling = s.context_sampling.replace(eos_token_id=eos,
                                                           pad_token_id=self.pad)
        self.choice_ids = (np.asarray(conversation.judge_choice_token_ids(tokenizer), np.int32)
                           if settings.judge_reply == "label" else None)
        self.image_id = conversation.image_token_id(tokenizer)
        if self.vision and self.image_id != model.config.image_token_id:
            raise ValueError(f"the tokenizer's <image> id {self.image_id} is not the model's "
                             f"image_token_id {model.config.image_token_id}")

    # -- device helpers

    def _put(self, array):
        if array is None:
            return None
        array = jnp.asarray(array)
        if self.mesh is None:
            return array
        return jax.device_put(array, su.batch_sharding(self.mesh, array.ndim))

    def encode(self, frames: np.ndarray):
        """Video tokens [B, N, H] of frames [B, T, S, S, 3] (None for a text model)."""
        if not self.vision:
            return None
        with su.sharding_context(self.mesh, self.rules):
            return self.decoder.encode_video(self.variables, self._put(frames))

    def _generate(self, input_ids, attention_mask, video_tokens, has_video, rng, sampling):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.vision:
            batch["has_video"] = has_video
        out = generate(self.decoder, self.variables, batch, rng, sampling,
                       video_tokens=video_tokens, mesh=self.mesh, rules=self.rules)
        return decode_texts(*jax.device_get((out.tokens, out.lengths, out.has_eos)),
                            self.tokenizer)

    # -- the three steps

    def sample_answers(self, input_ids, attention_mask, video_tokens, has_video, rng
                       ) -> list[tuple[str, str]]:
        """Two sampled answers per left-padded prompt."""
        texts = self._generate(input_ids, attention_mask, video_tokens, has_video, rng,
                               self.answer_sampling)
        return [(texts[2 * i], texts[2 * i + 1]) for i in range(len(texts) // 2)]

    def describe(self, frames: np.ndarray, rng) -> list[str]:
        """The context of each video: its clips described one by one, then joined."""
        clips = clip_frames(np.asarray(frames), self.settings.num_clips)
        ids = conversation.tokenize_prompt(conversation.video_question(prompts.context_prompt()),
                                           self.tokenizer)
        input_ids = np.repeat(ids[None], len(clips), axis=0)
        mask = np.ones_like(input_ids)
        texts = self._generate(input_ids, mask, self.encode(clips), np.ones(len(clips), bool),
                               rng, self.context_sampling)
        c = self.settings.num_clips
        return [prompts.join_clip_descriptions(texts[i * c:(i + 1) * c])
                for i in range(len(texts) // c)]

    def judge_rows(self, question_turns: Sequence[dict], answers: Sequence[tuple[str, str]],
                   contexts: Optional[Sequence[str]]) -> list[Optional[tuple]]:
        """The two judge inputs (order 1-2, order 2-1) of each pair, each as (token ids, the
        ids of the choices for the first- and second-listed answer); None where an input is
        longer than max_judge_length."""
        reply = self.settings.judge_reply
        rows = []
        for i, (turn, (a1, a2)) in enumerate(zip(question_turns, answers)):
            question = question_of(turn)
            with_video = prompts.IMAGE_TOKEN in turn["value"]
            pair = []
            for first, second in ((a1, a2), (a2, a1)):
                text = prompts.judge_prompt(question, first, second,
                                            None if contexts is None else contexts[i], reply)
                human = (conversation.video_question(text) if with_video
                         else {"from": "human", "value": text})
                if reply == "label":
                    pair.append((conversation.tokenize_prompt(human, self.tokenizer),
                                 self.choice_ids))
                else:
                    pair.append(restated_choice(human, first, second, self.tokenizer))
            too_long = max(len(ids) for ids, _ in pair) > self.settings.max_judge_length
            rows.append(None if too_long else tuple(pair))
        return rows

    def judge(self, rows: Sequence[Optional[tuple]], video_tokens, has_video
              ) -> np.ndarray:
        """P(answer 1 is better) in each order [B, 2] (NaN where a row is None): column 0 is
        P(first-listed choice) asked as (1, 2), column 1 is P(second-listed choice) asked as
        (2, 1)."""
        batch = len(rows)
        present = [r for r in rows if r is not None]
        if not present:
            return np.full((batch, 2), np.nan)
        filler = present[0]
        flat = [p for r in rows for p in (r if r is not None else filler)]  # row i*2 + order
        length = bucket_length(max(len(ids) for ids, _ in flat), self.settings.prompt_bucket)
        ids, mask = _left_pad([ids for ids, _ in flat], length, self.pad)
        choices = np.stack([c for _, c in flat])
        tokens = flags = None
        if self.vision:
            tokens = jnp.repeat(video_tokens, 2, axis=0)
            flags = self._put(np.repeat(np.asarray(has_video, bool), 2))
        with su.sharding_context(self.mesh, self.rules):
            logp = _choice_logprobs_jit(self.model, self.variables, self._put(ids),
                                        self._put(mask), tokens, flags, self._put(choices))
        p = np.exp(np.asarray(jax.device_get(logp), np.float64)).reshape(batch, 2, 2)
        both = np.stack([p[:, 0, 0], p[:, 1, 1]], axis=1)  # P(answer 1 better) per order
        both[[r is None for r in rows]] = np.nan
        return both


# ---------------------------------------------------------------------------------------------
# Decisions and records


def decide(p_orders: np.ndarray, margin: float) -> tuple[float, int, float, bool]:
    """(P(answer 1 better), preference 1|2, confidence, kept) from the two orders."""
    p1 = float(np.mean(p_orders))
    preference = 1 if p1 >= 0.5 else 2
    return p1, preference, max(p1, 1.0 - p1), abs(2.0 * p1 - 1.0) >= margin


def apply_margin(records: Sequence[dict], margin: float) -> list[dict]:
    """Records with `kept` and `drop_reason` set for `margin` (the judge's probabilities are
    stored, so another margin needs no new judging)."""
    out = []
    for record in records:
        record = dict(record)
        if record.get("p_output_1") is not None:
            kept = abs(2.0 * record["p_output_1"] - 1.0) >= margin
            record["kept"], record["drop_reason"] = kept, None if kept else "under_margin"
        else:
            record["kept"] = False
        out.append(record)
    return out


def truth_of(truths: Optional[dict], images: Any, question: str, a1: str, a2: str
             ) -> dict:
    """The synthetic world's truth about a pair: the scorer's preference and scores ({} when the
    video's truth is unknown)."""
    if not truths or not isinstance(images, str):
        return {}
    name = os.path.splitext(os.path.basename(images))[0]
    truth = truths.get(name)
    if truth is None:
        return {}
    from rlaif_jax.data.synthetic import scorer
    scores = [scorer.score_answer(truth, question, a).score for a in (a1, a2)]
    return {"true_preference": scorer.preference(truth, question, a1, a2),
            "true_scores": [float(s) for s in scores]}


def preference_item(record: dict) -> dict:
    """A kept record in the reference's preference format (+ confidence, id, truth)."""
    item = {"id": record["id"], "images": record["images"],
            "conversations": [record["question_turn"], {"from": "gpt", "value": ""}],
            "output_1": {"value": record["answers"][0]},
            "output_2": {"value": record["answers"][1]},
            "preference": record["preference"], "confidence": record["confidence"]}
    for key in ("true_preference", "true_scores"):
        if key in record:
            item[key] = record[key]
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

    with_context = [r for r in judged if r["context_mode"] == "clips"]
    agreement(with_context, "p_output_1", "")
    agreement(judged, "p_output_1_no_context", "_no_context")
    agreement(kept, "p_output_1", "_kept")
    truths = [r for r in kept if "true_preference" in r]
    if truths:
        out["feedback/kept_true_preference_2_fraction"] = float(np.mean(
            [r["true_preference"] == 2 for r in truths]))
    return out


# ---------------------------------------------------------------------------------------------
# Part files: one JSON line per finished prompt, so a rerun resumes


def read_records(path: str) -> list[dict]:
    """Complete JSON lines of a part file (a line cut by a crash is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("feedback: ignoring an incomplete line of %s", path)
    return records


def rewrite_complete(path: str, records: Sequence[dict]) -> None:
    """Rewrites a part file with only its complete records (atomically), if it had others."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = sum(1 for line in f if line.strip())
    if lines == len(records):
        return
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(temporary, path)


def append_records(path: str, records: Sequence[dict]) -> None:
    if not records:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def part_path(directory: str, process_index: int, process_count: int) -> str:
    return os.path.join(directory, f"part-{process_index:05d}-of-{process_count:05d}.jsonl")


def run_batches(engine: AIFeedback, pipeline, items_by_id: dict, out_path: str, rng: jax.Array,
                truths: Optional[dict] = None, progress: bool = True,
                stop_after: Optional[int] = None) -> list[dict]:
    """Runs the feedback over this process's rows of every batch of `pipeline` (a prompt
    pipeline with shuffle=False), appending one record per prompt to `out_path`; prompts
    already there are skipped. `stop_after` stops after that many batches (tests: a crash)."""
    settings = engine.settings
    done = read_records(out_path)
    rewrite_complete(out_path, done)  # drop a line a crash cut short before appending
    done_ids = {r["id"] for r in done}
    contexts = {r["video_id"]: r["context"] for r in done if r.get("context") is not None}
    steps = pipeline.steps_per_epoch
    bar = tqdm(total=steps, desc="feedback", unit="batch", disable=not progress)
    ran = 0
    for step in range(steps):
        bar.update(1)
        batch = pipeline.batch(step)
        valid = np.asarray(batch["valid"])
        records_in = [pipeline.record(i) if ok else None
                      for i, ok in zip(batch["index"], valid)]
        todo = [ok and str(r["id"]) not in done_ids for r, ok in zip(records_in, valid)]
        if not any(todo):
            continue
        if stop_after is not None and ran >= stop_after:
            break
        ran += 1
        # Filler rows copy a real row (static shapes); their outputs are ignored.
        first = int(np.argmax(valid))
        for key in ("input_ids", "attention_mask", "frames", "has_video"):
            batch[key] = np.where(
                valid.reshape((-1,) + (1,) * (batch[key].ndim - 1)), batch[key],
                batch[key][first:first + 1])
        key = jax.random.fold_in(rng, step)
        video_tokens = engine.encode(batch["frames"])
        has_video = batch["has_video"]
        answers = engine.sample_answers(batch["input_ids"], batch["attention_mask"],
                                        video_tokens, has_video, jax.random.fold_in(key, 0))
        turns = [conversation.first_human_turn(_turns(r)) if r else None for r in records_in]
        turns = [t if t is not None else turns[first] for t in turns]
        batch_contexts = None
        if settings.context == "clips":
            video_ids = [int(r["video"]) if r else -1 for r in records_in]
            if any(v not in contexts for v, t in zip(video_ids, todo) if t):
                described = engine.describe(batch["frames"], jax.random.fold_in(key, 1))
                for v, text, ok in zip(video_ids, described, valid):
                    if ok and v not in contexts:
                        contexts[v] = text
            batch_contexts = [contexts.get(v, "") for v in video_ids]
        rows = engine.judge_rows(turns, answers, batch_contexts)
        p = engine.judge(rows, video_tokens, has_video)
        p_none = None
        if settings.context == "clips" and settings.measure_no_context:
            p_none = engine.judge(engine.judge_rows(turns, answers, None), video_tokens,
                                  has_video)
        finished = []
        for row, record in enumerate(records_in):
            if not todo[row]:
                continue
            item = items_by_id.get(str(record["id"]), {})
            a1, a2 = answers[row]
            out = {"id": str(record["id"]), "video_id": int(record["video"]),
                   "images": item.get("images", item.get("video")),
                   "question_turn": turns[row], "answers": [a1, a2],
                   "context": None if batch_contexts is None else batch_contexts[row],
                   "context_mode": settings.context, "p_output_1": None,
                   "drop_reason": None}
            out.update(truth_of(truths, out["images"], question_of(turns[row]), a1, a2))
            if a1 == a2:
                out["drop_reason"] = "identical_answers"
            elif rows[row] is None:
                out["drop_reason"] = "judge_prompt_too_long"
            else:
                p1, preference, confidence, _ = decide(p[row], settings.margin)
                out.update(p_output_1=p1, p_orders=[float(x) for x in p[row]],
                           preference=preference, confidence=confidence)
                if p_none is not None and not np.isnan(p_none[row]).any():
                    out["p_output_1_no_context"] = float(np.mean(p_none[row]))
                elif settings.context == "none":
                    out["p_output_1_no_context"] = p1
            finished.append(out)
        append_records(out_path, finished)
        done_ids.update(r["id"] for r in finished)
    bar.close()
    return read_records(out_path)


def _turns(record: dict) -> list[dict]:
    return [{"from": r, "value": v} for r, v in zip(record["roles"], record["values"])]


# ---------------------------------------------------------------------------------------------
# The stage: config -> WORKDIR/feedback/{preferences.json, metrics.jsonl, parts/}


def _stage_path(init: str, workdir: str) -> str:
    """`stage:NAME` -> WORKDIR/NAME (as the training stages read config.init)."""
    return os.path.join(workdir, init[len("stage:"):]) if init.startswith("stage:") else init


def resolve_paths(config) -> dict:
    """Where the stage reads and writes; defaults point into the synthetic world of the
    workdir (WORKDIR/data/world, written by the SFT stage)."""
    from rlaif_jax.parallel.mesh import ConfigError

    workdir = os.path.abspath(config.workdir)
    world = config.world_dir or os.path.join(workdir, "data", "world")
    paths = {
        "stage": os.path.join(workdir, "feedback"),
        "init": _stage_path(config.init, workdir) or os.path.join(workdir, "sft"),
        "prompts": config.prompts or os.path.join(world, "ppo_prompts.json"),
        "video_root": config.video_root or world,
        "tokenizer": config.tokenizer or os.path.join(world, "tokenizer"),
        "truth": "" if config.truth == "none" else (
            config.truth or os.path.join(world, "truth.json")),
    }
    if not os.path.isfile(paths["prompts"]):
        raise ConfigError(f"prompts file {paths['prompts']} does not exist (set config.prompts, "
                          "or run the SFT stage first to write the synthetic world)")
    if paths["truth"] and not os.path.isfile(paths["truth"]):
        if config.truth:
            raise ConfigError(f"config.truth={config.truth}: no such file")
        paths["truth"] = ""  # not the synthetic world: no truth to compare with
    return paths


def settings_from_config(config) -> FeedbackSettings:
    s, c = config.sampling, config.context_sampling
    return FeedbackSettings(
        answer_sampling=SamplingConfig(max_new_tokens=s.max_new_tokens,
                                       temperature=float(s.temperature), top_k=s.top_k,
                                       top_p=float(s.top_p), prompt_bucket=config.prompt_bucket),
        context_sampling=SamplingConfig(max_new_tokens=c.max_new_tokens,
                                        temperature=float(c.temperature), top_k=c.top_k,
                                        top_p=float(c.top_p), prompt_bucket=config.prompt_bucket),
        num_clips=config.num_clips, context=config.context, judge_reply=config.judge_reply,
        measure_no_context=config.measure_no_context, margin=float(config.margin),
        max_judge_length=config.max_judge_length, prompt_bucket=config.prompt_bucket)


def _build_prompt_data(paths: dict, out_dir: str, num_frames: int, size: int) -> None:
    """A tfds build of the prompt set (frames decoded once); reused when it matches."""
    from rlaif_jax.data.build import BUILD_INFO, build

    info_path = os.path.join(out_dir, BUILD_INFO)
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if (info.get("json", {}).get("train") == paths["prompts"]
                and info.get("num_frames") == num_frames and info.get("size") == size):
            return
    build("prompt", {"train": paths["prompts"]}, paths["video_root"], out_dir, num_frames,
          size, overwrite=True, verbose=False)


def run_feedback(config) -> dict:
    """The feedback stage; returns its metrics (process 0) and writes preferences.json."""
    import transformers
    from jax.experimental import multihost_utils

    import rlaif_jax
    from rlaif_jax.data.builders.items_json import load_items
    from rlaif_jax.data.pipeline import Pipeline
    from rlaif_jax.parallel.mesh import ConfigError, make_mesh
    from rlaif_jax.engine.metrics import MetricsWriter

    settings = settings_from_config(config)
    paths = resolve_paths(config)
    primary = jax.process_index() == 0
    # Each process runs its slice of every batch on its own devices.
    mesh = make_mesh(config.mesh.to_dict(), jax.local_devices())
    rules = su.make_rules(config.rules)
    if config.batch_size % (jax.process_count() * su.batch_divisor(mesh)):
        raise ConfigError(f"batch_size={config.batch_size} must be a multiple of processes x "
                          f"batch shards = {jax.process_count()} x {su.batch_divisor(mesh)}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    model, params = rlaif_jax.from_pretrained(paths["init"], mesh, rules, tokenizer)
    variables = {"params": params}
    engine = AIFeedback(model, variables, tokenizer, settings, mesh, rules)

    stage_dir = paths["stage"]
    data_dir = os.path.join(stage_dir, "data")
    vision = engine.vision
    num_frames = model.config.num_frames if vision else 1
    size = model.config.vision.image_size if vision else 32
    if primary:
        os.makedirs(os.path.join(stage_dir, "parts"), exist_ok=True)
        with open(os.path.join(stage_dir, "config.json"), "w") as f:
            json.dump(json.loads(config.to_json_best_effort()), f, indent=2)
        _build_prompt_data(paths, data_dir, num_frames, size)
    multihost_utils.sync_global_devices("feedback: prompt data built")
    pipeline = Pipeline(data_dir, "train", tokenizer, config.batch_size,
                        config.max_prompt_length, config.seed, shuffle=False,
                        num_frames=num_frames)
    items = load_items(paths["prompts"])
    items_by_id = {str(item.get("id", item.get("uid", position))): item
                   for position, item in enumerate(items) if isinstance(item, dict)}
    truths = None
    if paths["truth"]:
        with open(paths["truth"]) as f:
            truths = json.load(f)
    part = part_path(os.path.join(stage_dir, "parts"), jax.process_index(), jax.process_count())
    run_batches(engine, pipeline, items_by_id, part, jax.random.PRNGKey(config.seed), truths,
                progress=primary and config.log.progress)
    multihost_utils.sync_global_devices("feedback: all parts written")
    if not primary:
        return {}

    records = []
    for index in range(jax.process_count()):
        records += read_records(part_path(os.path.join(stage_dir, "parts"), index,
                                          jax.process_count()))
    records = apply_margin(records, settings.margin)
    kept = [preference_item(r) for r in records if r["kept"]]
    with open(os.path.join(stage_dir, "preferences.json.tmp"), "w") as f:
        json.dump(kept, f, indent=1, ensure_ascii=False)
    os.replace(os.path.join(stage_dir, "preferences.json.tmp"),
               os.path.join(stage_dir, "preferences.json"))
    metrics = summarize(records, settings.margin)
    for reason, count in pipeline.skipped.items():
        metrics[f"feedback/skipped_{reason}"] = count
    build_info = json.load(open(os.path.join(data_dir, "build.json")))
    for reason, count in build_info.get("skipped_total", {}).items():
        metrics[f"feedback/skipped_{reason}"] = count
    writer = MetricsWriter(stage_dir, "feedback", tensorboard=config.log.tensorboard)
    writer.write(len(records), metrics)
    writer.close()
    print(f"[feedback] {len(kept)} preference pairs of {len(records)} prompts -> "
          f"{os.path.join(stage_dir, 'preferences.json')}", flush=True)
    for key in ("feedback/agreement_with_truth", "feedback/agreement_with_truth_no_context",
                "feedback/agreement_with_truth_decisive",
                "feedback/agreement_with_truth_no_context_decisive",
                "feedback/kept_fraction", "feedback/mean_confidence"):
        if key in metrics:
            print(f"[feedback] {key} = {metrics[key]:.4f}", flush=True)
    return metrics
