"""Dense multi-head attention written as two einsums, with grouped key/value heads.

Why not `jax.nn.dot_product_attention`'s XLA path: it maps grouped heads with a vmap (extra
dimensions and transposes in the backward pass), builds an all-true mask to AND with ours, and
scales the [T, S] logits instead of the [T, H] queries. On XLA:CPU those cost ~10% of a small
LLaMA's train step (docs/benchmarks.md); on TPU/GPU the compiler fuses either form.
Numerics follow it: scores and softmax in float32, masked scores set to a large negative
number (a row with no key left attends uniformly, as there), probabilities cast to v's dtype.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: Optional[jax.Array] = None) -> jax.Array:
    """q [B, T, N, H], k and v [B, S, K, H] with N a multiple of K; mask broadcastable to
    [B, 1, T, S] (True = attend). Returns [B, T, N, H] in q's dtype."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # Query head n uses key/value head n // groups, as transformers' repeat_kv.
    q = (q * jnp.asarray(head_dim ** -0.5, q.dtype)).reshape(
        batch, length, kv_heads, groups, head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.ndim == 4:  # [B, 1, T, S] -> [B, 1, 1, T, S]
            mask = mask[:, :, None]
        scores = jnp.where(mask, scores, jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max,
                                                     jnp.float32))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           block: int) -> jax.Array:
    """The same attention without the masked upper triangle: query block i (`block` rows) only
    scores the keys up to its own end. Valid when query t and key t are the same slot and the
    mask is causal (a forward over a whole sequence, no KV cache). Cuts the scores' FLOPs and
    memory to (n + 1) / 2n of dense for n blocks. Rows with no real key at all (left padding)
    attend uniformly over their block's keys instead of all keys: their output is unused."""
    length = q.shape[1]
    mask = jnp.asarray(mask, bool)
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        outs.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end],
                                          mask[..., start:end, :end]))
    return jnp.concatenate(outs, axis=1)
