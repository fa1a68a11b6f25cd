"""The AI judge of the feedback stage: the SFT policy samples two answers, describes the video
clip by clip (the context), and judges which answer is better in both orders.

1. `answer_samples` answers are sampled from the policy (temperature sampling, one prefill
   shared by all) and the first two distinct ones are kept: chosen by their text alone, never
   by the truth or the judge (with fewer than two distinct, the pair is dropped as identical);
2. the context, built by the same policy from the video's frames cut into `num_clips` clips (each
   resampled to the model's frame count, as the SFT data shows clips), greedy, joined as
   "Clip 1: ... Clip 2: ..." (`prompts.join_clip_descriptions`):
   - `describe`: each clip described with `prompts.context_prompt()`; one context per video,
     reused by its questions (the paper's narrative; `clips` is its former name);
   - `question`: the prompt's own question answered on each clip (a question-conditioned
     context, as the authors' unreleased caption helpers condition on the question);
   - `named_clip`: the prompt's question answered on the one clip its time phrase names ("at
     the end": the last clip; `prompts.clip_named_by`), given as "Clip 3: ..."; a question that
     names no part of the video gets no context (the judge sees the whole video already);
   - `none`: no context (the ablation);
3. the judge: the same policy reads the video, the question, both answers, the context and the
   principles (`prompts.judge_prompt`), and one forward pass gives its next-token log-probs of
   two choices: the labels `prompts.JUDGE_CHOICES` (`judge_reply='label'`, the paper's), or, when
   the judge is asked to restate the better answer (`'restate'`), the two answers' tokens where
   they first differ, after their common start. Asked in both orders, P(answer 1 is better) is
   the mean of P(answer 1's choice) in order (1, 2) and in order (2, 1), which cancels a position
   bias. `judge_reply='likelihood'` reads each answer alone instead: the policy is given the
   video, the context and the question (`prompts.question_with_context`), and each answer's
   mean log-probability per token (its end-of-turn token included) measures how confidently the
   judge would give it itself; P(answer 1 is better) = sigmoid(mean_1 - mean_2), the same in
   both orders. Pairs whose margin |2P - 1| is under `margin` are dropped, as are identical
   answers.

The video is encoded once per batch and its tokens reused by the sampler and both judge orders.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.data import conversation, prompts
from rlaif_jax.data.video import clip_frames
from rlaif_jax.models.heads import mean_token_logprob
from rlaif_jax.models.llama import Llama
from rlaif_jax.models.video_llm import is_video_model
from rlaif_jax.parallel import sharding as su
from rlaif_jax.sampling.generate import SamplingConfig, bucket_length, decoder_for, generate


# 'clips': the former 'describe'
CONTEXT_MODES = ("question", "named_clip", "describe", "clips", "none")
PER_VIDEO_CONTEXT = ("describe", "clips")  # contexts that do not depend on the question


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class FeedbackSettings:
    """How the feedback stage samples, describes and judges; built from configs/feedback.py
    (`settings_from_config` in feedback/stage.py), which holds the defaults."""

    answer_sampling: SamplingConfig  # num_samples is set to answer_samples
    context_sampling: SamplingConfig  # num_samples is forced to 1
    answer_samples: int  # answers sampled per prompt, of which two distinct ones are judged
    num_clips: int
    context: str  # CONTEXT_MODES: 'question', 'describe' or 'none' (the ablation)
    measure_no_context: bool  # with context: also judge without it, for the metrics
    margin: float  # drop pairs with |P(1) - P(2)| below this (applied when writing)
    judge_reply: str  # prompts.JUDGE_REPLIES: a label, the better answer restated, likelihood
    max_judge_length: int  # longer judge prompts are skipped and counted
    prompt_bucket: int

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
        if self.answer_samples < 2:
            raise ValueError(f"answer_samples={self.answer_samples}: must be >= 2")
        object.__setattr__(self, "answer_sampling",
                           self.answer_sampling.replace(num_samples=self.answer_samples))
        object.__setattr__(self, "context_sampling",
                           self.context_sampling.replace(num_samples=1))


# ---------------------------------------------------------------------------------------------
# Pieces


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


def _last_logits(model, variables, input_ids, attention_mask, video_tokens, has_video):
    """Next-token logits [B, V] after left-padded prompts (one forward, no cache)."""
    if is_video_model(model):
        out = model.apply(variables, input_ids, attention_mask, video_tokens=video_tokens,
                          has_video=has_video, compute_logits=False)
        return model.apply(variables, out.last_hidden_state[:, -1:], method="logits")[:, 0]
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


def _answer_mean_logprobs(model, variables, input_ids, attention_mask, video_tokens, has_video,
                          label_mask):
    """Mean log-prob per answer token [B] of right-padded rows; `label_mask` [B, L] marks the
    answer's tokens (the logit at slot s predicts the token at s + 1)."""
    if is_video_model(model):
        logits = model.apply(variables, input_ids, attention_mask, has_video=has_video,
                             video_tokens=video_tokens).logits
    else:
        logits = model.apply(variables, input_ids=input_ids, attention_mask=attention_mask).logits
    return mean_token_logprob(logits, input_ids, label_mask)


_answer_mean_logprobs_jit = jax.jit(_answer_mean_logprobs, static_argnames=("model",))


def distinct_pair(samples: Sequence[str]) -> tuple[str, str]:
    """The first two samples whose texts differ (after surrounding spaces), in sampling order;
    the first sample twice when all are the same."""
    first = samples[0]
    second = next((t for t in samples[1:] if t.strip() != first.strip()), first)
    return first, second


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
    """Samples answer pairs, writes contexts and judges, for batches in the format of docs/method.md.

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
        with su.mesh_context(self.mesh, self.rules):
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
        """Two answers per left-padded prompt: the first two distinct of its samples."""
        texts = self._generate(input_ids, attention_mask, video_tokens, has_video, rng,
                               self.answer_sampling)
        k = self.settings.answer_samples
        return [distinct_pair(texts[i * k:(i + 1) * k]) for i in range(len(texts) // k)]

    def describe(self, frames: np.ndarray, rng) -> list[str]:
        """The context of each video: its clips described one by one, then joined."""
        return self.clip_context(frames, [prompts.context_prompt()] * len(frames), rng)

    def clip_context(self, frames: np.ndarray, questions: Sequence[str], rng) -> list[str]:
        """Row i's context: `questions[i]` asked of each clip of video i, the clip answers
        joined in order ("Clip 1: ... Clip 2: ...")."""
        c = self.settings.num_clips
        clips = clip_frames(np.asarray(frames), c)
        rows = [conversation.tokenize_prompt(conversation.video_question(q), self.tokenizer)
                for q in questions for _ in range(c)]
        input_ids, mask = conversation.left_pad(rows, self.pad)
        texts = self._generate(input_ids, mask, self.encode(clips), np.ones(len(clips), bool),
                               rng, self.context_sampling)
        return [prompts.join_clip_descriptions(texts[i * c:(i + 1) * c])
                for i in range(len(texts) // c)]

    def named_clip_context(self, frames: np.ndarray, questions: Sequence[str], rng
                           ) -> list[Optional[str]]:
        """Row i's context: `questions[i]` asked of the one clip of video i that its time
        phrase names, as "Clip k: ..."; None where it names none (nothing is generated for a
        batch in which no question names a clip)."""
        c = self.settings.num_clips
        named = [prompts.clip_named_by(q, c) for q in questions]
        if all(k is None for k in named):
            return [None] * len(questions)
        clips = clip_frames(np.asarray(frames), c)  # video i's clip k at row i * c + k
        # Every row is asked (rows naming no clip on clip 0, answers dropped), so the sampler
        # sees one batch shape whatever the mix of questions.
        picked = clips[np.array([i * c + (k or 0) for i, k in enumerate(named)])]
        rows = [conversation.tokenize_prompt(conversation.video_question(q), self.tokenizer)
                for q in questions]
        input_ids, mask = conversation.left_pad(rows, self.pad)
        texts = self._generate(input_ids, mask, self.encode(picked), np.ones(len(picked), bool),
                               rng, self.context_sampling)
        return [None if k is None else prompts.join_clip_descriptions([t], [k + 1])
                for t, k in zip(texts, named)]

    def judge_rows(self, question_turns: Sequence[dict], answers: Sequence[tuple[str, str]],
                   contexts: Optional[Sequence[str]]) -> list[Optional[tuple]]:
        """The two judge inputs (order 1-2, order 2-1) of each pair, each as (token ids, the
        ids of the choices for the first- and second-listed answer); None where an input is
        longer than max_judge_length."""
        reply = self.settings.judge_reply
        if reply == "likelihood":
            return self._likelihood_rows(question_turns, answers, contexts)
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
        if self.settings.judge_reply == "likelihood":
            return self._judge_likelihood(rows, video_tokens, has_video)
        filler = present[0]
        flat = [p for r in rows for p in (r if r is not None else filler)]  # row i*2 + order
        length = bucket_length(max(len(ids) for ids, _ in flat), self.settings.prompt_bucket)
        ids, mask = conversation.left_pad([ids for ids, _ in flat], self.pad, length)
        choices = np.stack([c for _, c in flat])
        tokens, flags = self._video_for_two_rows_a_pair(video_tokens, has_video)
        with su.mesh_context(self.mesh, self.rules):
            logp = _choice_logprobs_jit(self.model, self.variables, self._put(ids),
                                        self._put(mask), tokens, flags, self._put(choices))
        p = np.exp(np.asarray(jax.device_get(logp), np.float64)).reshape(batch, 2, 2)
        both = np.stack([p[:, 0, 0], p[:, 1, 1]], axis=1)  # P(answer 1 better) per order
        both[[r is None for r in rows]] = np.nan
        return both

    def _video_for_two_rows_a_pair(self, video_tokens, has_video):
        """(video tokens, has_video) repeated for two judge rows per pair (the two orders, or
        the two answers); (None, None) for a text model."""
        if not self.vision:
            return None, None
        return (jnp.repeat(video_tokens, 2, axis=0),
                self._put(np.repeat(np.asarray(has_video, bool), 2)))

    def _likelihood_rows(self, question_turns, answers, contexts) -> list[Optional[tuple]]:
        """Per pair, each answer's (token ids, label mask) after the video, the context and the
        question; None where either is longer than max_judge_length."""
        rows = []
        for i, (turn, pair) in enumerate(zip(question_turns, answers)):
            text = prompts.question_with_context(question_of(turn),
                                                 None if contexts is None else contexts[i])
            human = (conversation.video_question(text) if prompts.IMAGE_TOKEN in turn["value"]
                     else {"from": "human", "value": text})
            tokenized = conversation.tokenize_conversations(
                [[human, {"from": "gpt", "value": answer}] for answer in pair], self.tokenizer)
            scored = tuple((t.input_ids, t.labels != conversation.IGNORE_INDEX) for t in tokenized)
            too_long = max(len(ids) for ids, _ in scored) > self.settings.max_judge_length
            rows.append(None if too_long else scored)
        return rows

    def _judge_likelihood(self, rows, video_tokens, has_video) -> np.ndarray:
        batch = len(rows)
        filler = next(r for r in rows if r is not None)
        flat = [a for r in rows for a in (r if r is not None else filler)]  # row i*2 + answer
        length = bucket_length(max(len(ids) for ids, _ in flat), self.settings.prompt_bucket)
        ids = np.full((len(flat), length), self.pad, np.int32)
        mask = np.zeros_like(ids)
        labels = np.zeros((len(flat), length), bool)
        for k, (row_ids, row_labels) in enumerate(flat):  # right-padded: the answers are read
            ids[k, :len(row_ids)], mask[k, :len(row_ids)] = row_ids, 1
            labels[k, :len(row_ids)] = row_labels
        tokens, flags = self._video_for_two_rows_a_pair(video_tokens, has_video)
        with su.mesh_context(self.mesh, self.rules):
            mean = _answer_mean_logprobs_jit(self.model, self.variables, self._put(ids),
                                             self._put(mask), tokens, flags, self._put(labels))
        mean = np.asarray(jax.device_get(mean), np.float64).reshape(batch, 2)
        p1 = 1.0 / (1.0 + np.exp(mean[:, 1] - mean[:, 0]))
        both = np.stack([p1, p1], axis=1)  # one reading: no order to average over
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
