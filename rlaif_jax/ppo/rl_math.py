"""PPO's arithmetic, as pure functions over [B, T] response-aligned arrays (docs/method.md stage 5).

Every array is aligned with the response tokens: column t is the t-th generated token; `mask` is 1
on real tokens (up to and including the EOS) and 0 on pads. Two pad conventions:

- masked (the default): pads take part in nothing. KL penalties, advantages, whitening statistics
  and loss means use real tokens only, and the sequence reward lands on the last real token.
- reference (`reference_pads=True`): what the reference trainer does. The KL penalty of every
  column enters the rewards, the sequence reward lands on the last padded column, GAE runs over
  all columns, whitening and both loss means include the pads.

Sums, not means, leave the loss functions: the train step (engine/step.py) adds the sums of its
micro-batches and divides once by the summed `weight` (tokens counted by the loss mask), so any
accumulation or sharding of a minibatch gives the same update as the minibatch in one piece.
Reductions over a sharded batch inside jit are global reductions, so `whiten` run under jit on
the whole rollout batch uses the statistics of the global batch on every device.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k3")


# ---------------------------------------------------------------------------------------------
# Truncation


def truncate_at_stop(tokens: jax.Array, mask: jax.Array, eos_token_id: int, pad_token_id: int,
                     extra_stop_ids: Sequence[int] = ()) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keeps each row up to and including its first stop token (EOS, or one of
    `extra_stop_ids`: the reference's "?" quirk); the rest becomes pads.

    -> (tokens, mask int32, has_eos bool [B]). A row cut at a "?" has no EOS, so it draws the
    no-EOS penalty, exactly as in the reference.
    """
    stops = tokens == eos_token_id
    for stop in extra_stop_ids:
        stops = stops | (tokens == stop)
    stops = stops & mask.astype(bool)
    # Columns strictly after the first stop: a stop has been seen at an earlier column.
    seen_before = (jnp.cumsum(stops.astype(jnp.int32), axis=1) - stops.astype(jnp.int32)) > 0
    keep = mask.astype(bool) & ~seen_before
    tokens = jnp.where(keep, tokens, pad_token_id)
    has_eos = jnp.any(keep & (tokens == eos_token_id), axis=1)
    return tokens, keep.astype(jnp.int32), has_eos


# ---------------------------------------------------------------------------------------------
# Reward shaping


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token KL(policy || reference) estimate from the sampled tokens' log-probs.

    k1: log p - log q clamped at 0 (as the reference does); k3: (r - 1) - log r with
    r = q / p, unbiased and never negative.
    """
    if estimator == "k1":
        return jnp.maximum(logprobs - ref_logprobs, 0.0)
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator {estimator!r}: expected one of {KL_ESTIMATORS}")


def last_real_index(mask: jax.Array) -> jax.Array:
    """Column of each row's last real token, [B] int32 (0 for an empty row)."""
    columns = jnp.arange(mask.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), columns, 0), axis=1)


def sequence_reward(score: jax.Array, mask: jax.Array, has_eos: jax.Array, *,
                    no_eos_penalty: float, length_penalty: float, max_length: int) -> jax.Array:
    """score + no_eos_penalty (rows without EOS) + length_penalty * length / max_length, [B]."""
    length = jnp.sum(mask, axis=1).astype(jnp.float32)
    reward = score.astype(jnp.float32) + jnp.where(has_eos, 0.0, no_eos_penalty)
    return reward + length_penalty * length / float(max_length)


def shape_rewards(score: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array,
                  mask: jax.Array, has_eos: jax.Array, *, kl_coef: float = 0.1,
                  kl_estimator: str = "k1", no_eos_penalty: float = -8.0,
                  length_penalty: float = -10.0, max_length: int = 896,
                  reward_scale: float = 10.0, reference_pads: bool = False) -> dict:
    """Per-token rewards: -kl_coef * KL at every token, plus the sequence reward at the end.

    Returns 'rewards' [B, T] (scaled by reward_scale, as the reference scales all shaped rewards
    before GAE), 'kl' [B, T] (zero at pads in masked mode), 'sequence_reward' [B] (unscaled).
    """
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
    if not reference_pads:
        kl = kl * mask
    reward = sequence_reward(score, mask, has_eos, no_eos_penalty=no_eos_penalty,
                             length_penalty=length_penalty, max_length=max_length)
    columns = jnp.arange(mask.shape[1], dtype=jnp.int32)[None]
    if reference_pads:
        at = jnp.full((mask.shape[0],), mask.shape[1] - 1, jnp.int32)
    else:
        at = last_real_index(mask)
    terminal = (columns == at[:, None]).astype(jnp.float32) * reward[:, None]
    rewards = reward_scale * (-kl_coef * kl + terminal)
    return {"rewards": rewards, "kl": kl, "sequence_reward": reward}


# ---------------------------------------------------------------------------------------------
# Advantages


def masked_gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
               lam: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation by a reverse scan over the columns.

    Masked columns are skipped, not treated as steps: the next value and the running advantage
    pass through them unchanged (so a gap inside a response does not break the recursion), and
    their advantage and return are 0. The value after the last real token is 0.
    With an all-ones mask this is the reference's GAE over every column.
    -> (advantages, returns = advantages + values), both [B, T].
    """
    mask = mask.astype(jnp.float32)
    rewards = rewards.astype(jnp.float32)
    values = values.astype(jnp.float32)

    def step(carry, column):
        next_value, next_advantage = carry
        reward, value, real = column
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(real > 0, value, next_value),
                 jnp.where(real > 0, advantage, next_advantage))
        return carry, advantage * real

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    columns = (rewards.T, values.T, mask.T)  # scan over T
    _, advantages = jax.lax.scan(step, (zeros, zeros), columns, reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8,
           ) -> jax.Array:
    """(x - mean) / sqrt(var + eps) with the mean and (biased) variance over the mask's entries
    of the WHOLE array: under jit on a sharded batch these are global statistics. Masked entries
    come out 0. Pass an all-ones mask to whiten over pads as the reference does."""
    mask = mask.astype(jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------------------------------------
# Losses (sums over the loss mask; the step divides by the summed weight)


def loss_mask(mask: jax.Array, reference_pads: bool) -> jax.Array:
    """The entries that losses and their statistics average over."""
    return jnp.ones_like(mask, jnp.float32) if reference_pads else mask.astype(jnp.float32)


def policy_loss_sums(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                     weights: jax.Array, clip: float = 0.2) -> dict:
    """Clipped surrogate: max(-A r, -A clip(r, 1 - c, 1 + c)), r = exp(logp - old_logp).
    Sums of 'pg_loss', 'clipfrac' (the clipped branch strictly larger) and 'approx_kl'
    (0.5 (logp - old_logp)^2) over `weights`."""
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = jnp.maximum(unclipped, clipped)
    return {"pg_loss": jnp.sum(loss * weights),
            "pg_clipfrac": jnp.sum((clipped > unclipped) * weights),
            "approx_kl": jnp.sum(0.5 * jnp.square(log_ratio) * weights)}


def value_loss_sums(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                    weights: jax.Array, clip: float = 0.2) -> dict:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2): sums of 'vf_loss',
    'vf_clipfrac' and 'value_error' ((v - R)^2) over `weights`."""
    clipped_values = jnp.clip(values, old_values - clip, old_values + clip)
    error = jnp.square(values - returns)
    error_clipped = jnp.square(clipped_values - returns)
    return {"vf_loss": jnp.sum(0.5 * jnp.maximum(error, error_clipped) * weights),
            "vf_clipfrac": jnp.sum((error_clipped > error) * weights),
            "value_error": jnp.sum(error * weights)}


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of each position's distribution, [..., V] -> [...], in float32."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def ppo_loss_sums(logprobs: jax.Array, values: jax.Array, entropy: jax.Array, batch: dict, *,
                  clip: float = 0.2, value_clip: float = 0.2, value_coef: float = 0.1,
                  reference_pads: bool = False) -> tuple[jax.Array, dict]:
    """The summed objective of one (micro-)batch: pg_loss + value_coef * vf_loss, both summed
    over the loss mask, and every statistic's sum with 'weight' (the mask's count).

    `batch` holds the rollout arrays 'mask', 'old_logprobs', 'old_values', 'advantages',
    'returns', all [B, T]."""
    weights = loss_mask(batch["mask"], reference_pads)
    sums = policy_loss_sums(logprobs, batch["old_logprobs"], batch["advantages"], weights, clip)
    sums.update(value_loss_sums(values, batch["old_values"], batch["returns"], weights,
                                value_clip))
    sums["entropy"] = jnp.sum(entropy * weights)
    total = sums["pg_loss"] + value_coef * sums["vf_loss"]
    sums["loss"] = total
    sums["weight"] = jnp.sum(weights).astype(jnp.int32)
    return total, sums


def advantages_and_returns(rewards: jax.Array, values: jax.Array, mask: jax.Array, *,
                           gamma: float = 1.0, lam: float = 1.0, reference_pads: bool = False,
                           whiten_advantages: bool = True) -> tuple[jax.Array, jax.Array]:
    """GAE over the real tokens (or over every column in reference mode), returns =
    advantages + values, then advantages whitened over the whole batch given."""
    steps = loss_mask(mask, reference_pads)
    advantages, returns = masked_gae(rewards, values * steps, steps, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, steps)
    return advantages, returns
