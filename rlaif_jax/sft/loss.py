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


def _final_hidden(model, variables, batch) -> jax.Array:
    """Final hidden states [B, L, H] of a text LLaMA or a video LLM (at the text positions) on
    a batch (docs/method.md, Formats); the LM head is left to `target_log_probs`."""
    if is_video_model(model):
        out = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                          frames=batch.get("frames"), has_video=batch.get("has_video"),
                          compute_logits=False)
    else:
        out = model.apply(variables, input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"], compute_logits=False)
    return out.last_hidden_state


def _shifted_targets(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ids that positions 0..L-2 predict (ignored labels replaced by 0) and their mask."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return jnp.where(mask, targets, 0), mask


def _token_sums(log_probs: jax.Array, is_top: jax.Array, mask: jax.Array) -> dict:
    nll = jnp.where(mask, -log_probs, 0.0)
    hits = is_top & mask
    has_label = mask.any(axis=-1)
    row_exact = jnp.all(hits | ~mask, axis=-1) & has_label
    return {"loss": nll.sum(), "accuracy": hits.sum().astype(jnp.float32),
            "weight": mask.sum().astype(jnp.int32),
            "exact": row_exact.sum().astype(jnp.float32),
            "sequences": has_label.sum().astype(jnp.float32)}


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> dict:
    """Sums over the labelled tokens of `labels` (aligned with the inputs, shifted here):
    'loss' (summed NLL), 'accuracy' (summed argmax hits), 'weight' (token count),
    'exact' and 'sequences' (rows whose every labelled token is the argmax, and rows with
    any label: greedy decoding reproduces the reference answer iff the row is exact)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets, mask = _shifted_targets(labels)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    log_probs = picked - jax.nn.logsumexp(logits, axis=-1)
    return _token_sums(log_probs, jnp.argmax(logits, axis=-1) == targets, mask)


def model_token_cross_entropy(model: Any, variables: Any, batch: Mapping[str, jax.Array]
                              ) -> dict:
    """`token_cross_entropy` of the model on a batch, through the model's fused head and
    log-probability (`target_log_probs`): no [B, L, vocab] logits are returned, and the
    backward pass is cheaper. A hit is the target having the largest logit (argmax's first
    index only differs on exact ties)."""
    hidden = _final_hidden(model, variables, batch)
    targets, mask = _shifted_targets(batch["labels"])
    log_probs, is_top = model.apply(variables, hidden[:, :-1], targets,
                                    method="target_log_probs")
    return _token_sums(log_probs, is_top, mask)


def make_sft_loss(model: Any):
    """loss_fn(variables, batch, rng) -> (loss_sum, sums) for engine/step.py."""

    def loss_fn(variables, batch, rng):
        del rng  # no dropout in these models
        sums = model_token_cross_entropy(model, variables, batch)
        sums.pop("exact"), sums.pop("sequences")
        return sums["loss"], sums

    return loss_fn


def make_sft_eval(model: Any):
    """eval fn(variables, batch) -> sums of token_cross_entropy (for held-out loss/accuracy)."""

    def eval_fn(variables, batch):
        return model_token_cross_entropy(model, variables, batch)

    return eval_fn


