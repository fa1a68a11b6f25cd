"""Scalar heads on a decoder's final hidden states: the reward model's and the value model's.

`RewardHead`: Linear(H, 1) read at each row's last real token (works for left and right padding).
`ValueHead`: Linear(H, 1) with weight and bias zero-initialised, one value per position; the
value for response token t is read from position t-1 by the caller (docs/method.md), as for logits.
Both return float32. `mean_token_logprob` reads the LM head instead: how likely a model finds
some tokens of a row (the likelihood judge's reading of an answer, the RM's likelihood term).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax.models.lora import Projection


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of each row's last real (mask 1) position, [B] int32; 0 for an all-pad row."""
    length = attention_mask.shape[-1]
    positions = jnp.arange(length, dtype=jnp.int32)
    return jnp.max(jnp.where(attention_mask.astype(bool), positions, 0), axis=-1)


class RewardHead(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """hidden [B, L, H], attention_mask [B, L] -> reward [B] at the last real token."""
        index = last_token_index(attention_mask)
        last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
        score = Projection(1, ("embed", None), use_bias=True, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="score")(last)
        return score[:, 0].astype(jnp.float32)


class ValueHead(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, L, H] -> values [B, L]; exactly zero at init (zero weight and bias)."""
        value = Projection(1, ("embed", None), use_bias=True, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros,
                           name="score")(hidden)
        return value[..., 0].astype(jnp.float32)


def mean_token_logprob(logits: jax.Array, input_ids: jax.Array, token_mask: jax.Array
                       ) -> jax.Array:
    """Mean log-probability per token [B] of each row's tokens under `token_mask` [B, L], each
    predicted from the position before it (logits [B, L, V] aligned with input_ids [B, L])."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    mask = token_mask[:, 1:].astype(bool)
    # where, not a product: a pad position's logits need not be finite.
    total = jnp.sum(jnp.where(mask, chosen, 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)
