"""Stage 1 (and 4): supervised fine-tuning, cross entropy on the assistant's tokens.

The loss is summed over labelled tokens and weighted by their count (see engine/step.py), so
gradient accumulation and any sharding of the batch give the same update as one big batch.
Labels follow transformers' shift: the logit at t - 1 predicts labels[t]; -100 means no loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from rlaif_jax.models.video_llm import is_video_model

IGNORE_INDEX = -100


def model_logits(model: Any, variables: Any, batch: Mapping[str, jax.Array],
                 compute_logits: bool = True):
    """Forward pass of a text LLaMA or a video LLM on a batch (docs/method.md, Formats)."""
    if is_video_model(model):
        return model.apply(variables, batch["input_ids"], batch["attention_mask"],
                           frames=batch.get("frames"), has_video=batch.get("has_video"),
                           compute_logits=compute_logits).logits
    return model.apply(variables, input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"],
                       compute_logits=compute_logits).logits


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> dict:
    """Sums over the labelled tokens of `labels` (aligned with the inputs, shifted here):
    'loss' (summed NLL), 'accuracy' (summed argmax hits), 'weight' (token count),
    'exact' and 'sequences' (rows whose every labelled token is the argmax, and rows with
    any label: greedy decoding reproduces the reference answer iff the row is exact)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = jnp.where(mask, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = (logz - picked) * mask
    hits = (jnp.argmax(logits, axis=-1) == safe) & mask
    has_label = mask.any(axis=-1)
    row_exact = jnp.all(hits | ~mask, axis=-1) & has_label
    return {"loss": nll.sum(), "accuracy": hits.sum().astype(jnp.float32),
            "weight": mask.sum().astype(jnp.int32),
            "exact": row_exact.sum().astype(jnp.float32),
            "sequences": has_label.sum().astype(jnp.float32)}


def make_sft_loss(model: Any):
    """loss_fn(variables, batch, rng) -> (loss_sum, sums) for engine/step.py."""

    def loss_fn(variables, batch, rng):
        del rng  # no dropout in these models
        sums = token_cross_entropy(model_logits(model, variables, batch), batch["labels"])
        sums.pop("exact"), sums.pop("sequences")
        return sums["loss"], sums

    return loss_fn


def make_sft_eval(model: Any):
    """eval fn(variables, batch) -> sums of token_cross_entropy (for held-out loss/accuracy)."""

    def eval_fn(variables, batch):
        return token_cross_entropy(model_logits(model, variables, batch), batch["labels"])

    return eval_fn


