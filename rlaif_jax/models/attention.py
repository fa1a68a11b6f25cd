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
import numpy as np

# The score of a masked key: far below any real score, yet finite (a row with no key left then
# attends uniformly instead of producing NaN).
MASKED_SCORE = np.float32(-0.7 * np.finfo(np.float32).max)


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
        scores = jnp.where(mask, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(batch, length, heads, head_dim).astype(q.dtype)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     k_new: jax.Array, v_new: jax.Array,
                     k_scale: Optional[jax.Array] = None,
                     v_scale: Optional[jax.Array] = None) -> jax.Array:
    """`dot_product_attention` for one query a row (a decode step): q [B, 1, N, H] attends over
    a layer of the KV cache k / v [B, S, K, H] as it was BEFORE this step, where `mask`
    (broadcastable to [B, 1, 1, S]) must leave out the slot being written, plus this step's own
    key / value k_new / v_new [B, 1, K, H].

    The step's own key is separate so that the cache is only read here and written once after
    the layer loop (models/kv_cache.py says why that keeps the write in place). Int8 caches
    pass k_scale / v_scale [B, S, K]: the scales multiply the scores and the probabilities, so
    no dequantised copy of the layer is made.
    Why multiply-and-sum rather than einsums: a dot wants the batch dimensions (rows, heads)
    leading, so the cache's [B, S, K, H] layer would be transposed into a copy each step
    (XLA:CPU does); the elementwise form reads the cache once where it lies, and with one query
    there is no matmul to lose."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    out_dtype = q.dtype
    q = (q.astype(jnp.float32) * head_dim ** -0.5).reshape(batch, 1, kv_heads, groups, head_dim)
    f32 = lambda x: x.astype(jnp.float32)
    # scores[b, s, k, g] = sum_h q[b, k, g, h] * key[b, s, k, h]
    cached = jnp.sum(q * f32(k)[:, :, :, None], axis=-1)  # [B, S, K, G]
    if k_scale is not None:
        cached = cached * k_scale[..., None]
    mask = jnp.asarray(mask, bool).reshape(batch, -1, 1, 1)
    cached = jnp.where(mask, cached, MASKED_SCORE)
    own = jnp.sum(q * f32(k_new)[:, :, :, None], axis=-1)  # [B, 1, K, G]
    probs = jax.nn.softmax(jnp.concatenate([cached, own], axis=1), axis=1)
    cached_probs, own_probs = probs[:, :-1], probs[:, -1:]
    if v_scale is not None:
        cached_probs = cached_probs * v_scale[..., None]
    # out[b, k, g, h] = sum_s probs[b, s, k, g] * value[b, s, k, h]
    out = (jnp.sum(cached_probs[..., None] * f32(v)[:, :, :, None], axis=1)
           + own_probs[:, 0, ..., None] * f32(v_new)[:, 0, :, None])
    return out.reshape(batch, length, heads, head_dim).astype(out_dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     k_scale: Optional[jax.Array] = None,
                     v_scale: Optional[jax.Array] = None) -> jax.Array:
    """Queries q [B, T, N, H] over one layer of a heads-major KV cache k / v [B, K, S, H]
    (`kv_cache.to_layers`) that already holds the queries' own keys; mask broadcastable to
    [B, 1, T, S] (True = attend). Int8 caches pass k_scale / v_scale [B, K, S].

    With the heads ahead of the slots, both products are batched matmuls over (rows, heads)
    that read the layer where it lies: the decode step on XLA:CPU, where the elementwise form
    of `decode_attention` is materialised in several passes over the cache."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    out_dtype, f32 = q.dtype, jnp.float32
    # [B, T, K, G, H] -> [B, K, G*T, H]: query head n uses key/value head n // groups.
    q = (q.astype(f32) * head_dim ** -0.5).reshape(batch, length, kv_heads, groups, head_dim)
    q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(batch, kv_heads, groups * length, head_dim)
    k = k.astype(f32) if k_scale is None else k.astype(f32) * k_scale[..., None]
    v = v.astype(f32) if v_scale is None else v.astype(f32) * v_scale[..., None]
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=f32)
    scores = scores.reshape(batch, kv_heads, groups, length, -1)
    mask = jnp.asarray(mask, bool).reshape(batch, 1, 1, length, -1)
    scores = jnp.where(mask, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(batch, kv_heads, groups * length, -1)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v, preferred_element_type=f32)
    out = jnp.transpose(out.reshape(batch, kv_heads, groups, length, head_dim), (0, 3, 1, 2, 4))
    return out.reshape(batch, length, heads, head_dim).astype(out_dtype)


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    k_new: jax.Array, v_new: jax.Array, own_mask: jax.Array,
                    k_scale: Optional[jax.Array] = None,
                    v_scale: Optional[jax.Array] = None) -> jax.Array:
    """Several queries q [B, T, N, H] over a KV cache layer k / v [B, S, K, H] that does not
    hold them yet (`mask` [B, 1, T, S] leaves their slots out) and over their own keys k_new /
    v_new [B, T, K, H] (`own_mask` [B, 1, T, T]). A rare path (a chunk appended to a longer
    cache), so it simply concatenates the two key sets."""
    if k_scale is not None:  # int8 cache: dequantise this layer
        k = k.astype(jnp.float32) * k_scale[..., None]
        v = v.astype(jnp.float32) * v_scale[..., None]
    keys = jnp.concatenate([k.astype(q.dtype), k_new.astype(q.dtype)], axis=1)
    values = jnp.concatenate([v.astype(q.dtype), v_new.astype(q.dtype)], axis=1)
    return dot_product_attention(q, keys, values, jnp.concatenate([mask, own_mask], axis=-1))


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           block: int) -> jax.Array:
    """The same attention without the masked upper triangle: query block i (`block` rows) only
    scores the keys up to its own end. Valid when query t and key t are the same slot and the
    mask is causal (a forward over a whole sequence, no KV cache). Cuts the scores' FLOPs and
    memory to (n + 1) / 2n of dense for n blocks. Rows with no real key at all (left padding)
    attend uniformly over their block's keys instead of all keys: their output is unused.

    Each block is one `_block_attention` (a custom gradient that keeps no probabilities), on
    heads-major copies of q, k and v made once for all blocks."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # [B, T, N, H] -> [B, K, G, T, H]: query head n uses key/value head n // groups.
    q = (q * jnp.asarray(head_dim ** -0.5, q.dtype)).reshape(
        batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape(mask.shape[:-3] + (1, 1) + mask.shape[-2:])  # [B|1, 1, 1, T, S]
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        outs.append(_block_attention(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end],
                                     mask[..., start:end, :end]))
    out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]
    return out.reshape(batch, length, heads, head_dim)


def _block_scores(q, k, mask):
    """Masked float32 scores [B, K, G, T, S] of scaled queries q [B, K, G, T, H] over k
    [B, K, S, H]."""
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores, MASKED_SCORE)


def _block_forward(q, k, v, mask):
    scores = _block_scores(q, k, mask)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)  # unnormalised probabilities
    inverse_sum = 1.0 / jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksh->bkgth", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) * inverse_sum
    return out.astype(q.dtype), (top, inverse_sum)


@jax.custom_vjp
def _block_attention(q, k, v, mask):
    """Softmax attention of one query block (q [B, K, G, T, H], already scaled) over its keys
    k, v [B, K, S, H], mask [..., T, S]. The backward pass recomputes the probabilities from
    the scores and each row's max and sum instead of keeping them, as flash attention does: on
    XLA:CPU that is ~20% faster than differentiating the forward (batch 4 x 512, 8 heads: 59
    against 78 ms a layer, forward and backward; PyTorch's CPU flash attention 57 ms)."""
    return _block_forward(q, k, v, mask)[0]


def _block_attention_fwd(q, k, v, mask):
    out, (top, inverse_sum) = _block_forward(q, k, v, mask)
    return out, (q, k, v, mask, out, top, inverse_sum)


def _block_attention_bwd(saved, d_out):
    q, k, v, mask, out, top, inverse_sum = saved
    f32 = jnp.float32
    probs = jnp.exp(_block_scores(q, k, mask) - top) * inverse_sum
    d_out = d_out.astype(f32)
    d_v = jnp.einsum("bkgts,bkgth->bksh", probs, d_out)
    d_probs = jnp.einsum("bkgth,bksh->bkgts", d_out, v, preferred_element_type=f32)
    # Softmax's backward; a masked score is a constant, so it passes no gradient on.
    row_dot = jnp.sum(d_out * out.astype(f32), axis=-1, keepdims=True)
    d_scores = jnp.where(mask, probs * (d_probs - row_dot), 0.0)
    d_q = jnp.einsum("bkgts,bksh->bkgth", d_scores, k, preferred_element_type=f32)
    d_k = jnp.einsum("bkgts,bkgth->bksh", d_scores, q, preferred_element_type=f32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)
