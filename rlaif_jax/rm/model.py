"""Stage 3: the reward model, trained on preference pairs (Bradley-Terry).

The RM is the video LLM with a scalar `reward_head` read at the last real token of
(conversation with one response + the evaluation prompt of `prompts.rm_evaluation_prompt`: the
user asks the assistant to rate its last response, whose turn ends "...the quality score of my
last response is"). `conversation.tokenize_for_reward_model` writes those rows for training,
and `reward_model_rows` writes them the same way for PPO, so PPO scores exactly as the RM was
trained.

Loss (the reference's): BCE-with-logits on r(output_2) - r(output_1) with target 1 when output_2
is preferred (= Bradley-Terry), plus 1e-3 * |mean(r1 + r2)|, which keeps the rewards centred.
The BCE is summed over pairs and weighted by their count (engine/step.py); the centring term is
a batch mean, so the step adds it as `pairs * |mean|` of its batch: exact without accumulation,
a weighted mean of the micro-batches' terms with it.

`likelihood_weight` w > 0 adds w * (the response's mean log-probability per token under the RM's
own language model, given the video and question) to the head's score. At the start the head
is near zero, so the RM starts as the likelihood judge of the SFT model it was made from, and
Bradley-Terry training moves both terms. A scalar head alone has to learn from a few hundred
pairs what the model already knows about the video; on the tiny world it does not
(docs/feedback_and_rm.md). w = 0 is the paper's RM.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.data import conversation
from rlaif_jax.models.heads import mean_token_logprob

CENTER_COEF = 1e-3


def pair_rewards(model: Any, variables: Any, batch: Mapping[str, jax.Array],
                 likelihood_weight: float = 0.0) -> jax.Array:
    """Rewards [B, 2] of a preference batch: `input_ids`, `attention_mask` [B, 2, L] (padded on
    either side), `frames` [B, T, S, S, 3] and `has_video` [B]; `response_mask` [B, 2, L] with
    a likelihood weight. Each video is encoded once and shared by its two candidates."""
    ids = batch["input_ids"]
    pairs, candidates, length = ids.shape
    flat = {key: batch[key].reshape(pairs * candidates, length)
            for key in ("input_ids", "attention_mask", "response_mask") if key in batch}
    video_tokens = has_video = None
    if batch.get("frames") is not None:
        video_tokens = model.apply(variables, batch["frames"], method="encode_video")
        video_tokens = jnp.repeat(video_tokens, candidates, axis=0)
        has_video = batch.get("has_video")
        has_video = (jnp.ones((pairs,), bool) if has_video is None else has_video.astype(bool))
        has_video = jnp.repeat(has_video, candidates, axis=0)
    flat["video_tokens"], flat["has_video"] = video_tokens, has_video
    return reward_scores(model, variables, flat, likelihood_weight).reshape(pairs, candidates)


def reward_scores(model: Any, variables: Any, batch: Mapping[str, jax.Array],
                  likelihood_weight: float = 0.0) -> jax.Array:
    """Scores [B] of reward-model rows (`reward_model_rows`, or the pipeline's candidates):
    `input_ids`, `attention_mask` [B, L] (left or right padded: the head reads each row's last
    real token), and for videos `has_video` [B] with `frames` or precomputed `video_tokens`;
    with a likelihood weight also `response_mask` [B, L]."""
    out = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                      frames=batch.get("frames"), has_video=batch.get("has_video"),
                      video_tokens=batch.get("video_tokens"),
                      compute_logits=bool(likelihood_weight))
    if out.reward is None:
        raise ValueError("the model has no reward head (set reward_head=True in its config)")
    if not likelihood_weight:
        return out.reward
    if "response_mask" not in batch:
        raise ValueError("an RM with a likelihood term needs the rows' response_mask")
    return out.reward + likelihood_weight * mean_token_logprob(
        out.logits, batch["input_ids"], batch["response_mask"])


def preference_loss_sums(rewards: jax.Array, preference: jax.Array,
                         weights: jax.Array | None = None,
                         center_coef: float = CENTER_COEF) -> tuple[jax.Array, dict]:
    """(loss summed over pairs, sums) for engine/step.py. rewards [B, 2] (output_1, output_2),
    preference [B] in {1, 2}; pairs with weight 0 (filler rows, a label outside {1, 2}) count
    nowhere. Sums: loss, bt_loss, center, accuracy (a tie counts one half), weight (pairs)."""
    rewards = rewards.astype(jnp.float32)
    valid = (preference == 1) | (preference == 2)
    w = valid.astype(jnp.float32) if weights is None else valid * weights.astype(jnp.float32)
    target = (preference == 2).astype(jnp.float32)
    margin = rewards[:, 1] - rewards[:, 0]
    # BCE with logits, stable: softplus(m) - y * m.
    bce = jax.nn.softplus(margin) - target * margin
    pairs = jnp.sum(w)
    mean_sum = jnp.sum(w * (rewards[:, 0] + rewards[:, 1])) / jnp.maximum(pairs, 1.0)
    center = pairs * jnp.abs(mean_sum)
    bt = jnp.sum(w * bce)
    hits = jnp.where(margin == 0, 0.5, ((margin > 0) == (target > 0)).astype(jnp.float32))
    sums = {"loss": bt + center_coef * center, "bt_loss": bt, "center": center,
            "accuracy": jnp.sum(w * hits), "reward_mean": jnp.sum(w[:, None] * rewards) / 2,
            "weight": pairs}
    return sums["loss"], sums


def make_rm_loss(model: Any, center_coef: float = CENTER_COEF, likelihood_weight: float = 0.0):
    """loss_fn(variables, batch, rng) -> (loss_sum, sums) for engine/step.py."""

    def loss_fn(variables, batch, rng):
        del rng  # no dropout in these models
        rewards = pair_rewards(model, variables, batch, likelihood_weight)
        return preference_loss_sums(rewards, batch["preference"], batch.get("valid"),
                                    center_coef)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Rows for scoring outside training (PPO): the same tokenisation as the RM's training data.


def reward_model_rows(question_turns: Sequence[dict], responses: Sequence[str], tokenizer,
                      max_length: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded RM rows [B, L] of (question turn, response text) pairs: the question, the
    response (with its closing eos) and the evaluation prompt, exactly as the RM was trained
    (`conversation.reward_model_row`; an over-long response is cut, never the prompt), with
    the response's tokens marked in `response_mask`. L = pad_to or max_length."""
    rows = [conversation.reward_model_row(q, r, tokenizer, max_length)
            for q, r in zip(question_turns, responses)]
    length = pad_to or max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    response_mask = np.zeros((len(rows), length), np.int32)
    for i, (row, in_response) in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        response_mask[i, :len(row)] = in_response
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask}
