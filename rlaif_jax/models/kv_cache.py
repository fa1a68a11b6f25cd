"""The decoder's KV cache: one stacked buffer per K and V, written in place a slot at a time.

Layout `{'k', 'v'}` of shape [layers, batch, slots, kv_heads, head_dim]. In a step each layer
reads its slots with a dynamic index (attending to the step's own key separately), and after the
layer loop one `dynamic_update_slice` a buffer writes all layers' new slots: no layer's slice is
copied, rewritten or re-stacked. With scanned layers that write comes after the layer loop,
hence after every read, so XLA updates the buffer (a carry of the sampler's decode loop, or a
donated argument) in place. Writing inside the layer loop instead either let XLA fuse the write
into the next read, keeping old and new buffers alive, or left the read-write order open; both
cost a copy of the whole cache a step on XLA:CPU. Unscanned layers leave the last layer's reads
unordered against the write, and XLA:CPU still copies there (the TPU compiler does not).

An int8 cache adds `k_scale` / `v_scale` [layers, batch, slots, kv_heads] float32: each slot
and head is stored as round(x / scale) with scale = max|x| / 127 over head_dim. Attention applies
the scales to the scores and probabilities (models/attention.py), so the int8 values are read as
they are stored.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
                "int8": jnp.int8}
INT8_MAX = 127.0


def init_cache(config, batch_size: int, max_length: int, dtype=None) -> dict:
    """Zeros of [layers, batch, max_length, kv_heads, head_dim] in `dtype` (a dtype or a
    CACHE_DTYPES name; default the compute dtype); int8 adds the per-slot scales."""
    if isinstance(dtype, str):
        dtype = CACHE_DTYPES[dtype]
    dtype = jnp.dtype(dtype or config.compute_dtype)
    shape = (config.num_layers, batch_size, max_length, config.kv_heads, config.dim_per_head)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    if dtype == jnp.int8:
        cache["k_scale"] = jnp.zeros(shape[:-1], jnp.float32)
        cache["v_scale"] = jnp.zeros(shape[:-1], jnp.float32)
    return cache


def is_quantized(cache: dict) -> bool:
    return "k_scale" in cache


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 values and float32 scales [..., heads] of x [..., heads, head_dim]."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    values = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scale


def write(cache: dict, cache_index, k: jax.Array, v: jax.Array) -> dict:
    """The cache with every layer's k, v [layers, B, L, kv_heads, head_dim] written at slots
    cache_index.. (one dynamic_update_slice a buffer: in place when the cache is a loop carry
    and nothing reads the old buffer afterwards)."""
    updates = {"k": k, "v": v}
    if is_quantized(cache):
        updates["k"], updates["k_scale"] = quantize(k)
        updates["v"], updates["v_scale"] = quantize(v)
    out = {}
    for name, buffer in cache.items():
        start = (0, 0, cache_index) + (0,) * (buffer.ndim - 3)
        out[name] = jax.lax.dynamic_update_slice(buffer, updates[name].astype(buffer.dtype),
                                                 start)
    return out


def read(cache: dict, layer) -> tuple[jax.Array, jax.Array, Optional[jax.Array],
                                      Optional[jax.Array]]:
    """(k, v, k_scale, v_scale) of one layer; the scales are None unless the cache is int8."""
    take = lambda name: jax.lax.dynamic_index_in_dim(cache[name], layer, 0, keepdims=False)
    if is_quantized(cache):
        return take("k"), take("v"), take("k_scale"), take("v_scale")
    return take("k"), take("v"), None, None


# ---------------------------------------------------------------------------------------------
# Per-layer, heads-major buffers: the CPU decode loop's layout


def to_layers(cache: dict) -> dict:
    """The stacked cache as one buffer per layer, heads before slots: {'k': (L arrays of
    [batch, kv_heads, slots, head_dim]), ...} (int8 scales [batch, kv_heads, slots]).

    What XLA:CPU decodes fastest (one transposed copy a generate call): each layer's buffer is
    an operand of its own (no slice of a stacked buffer is materialised), the step writes its
    slot into it before attending (so the write is in place and nothing else orders it), and
    with the heads leading, the scores and the weighted sum are batched matmuls over the whole
    layer without a transposed copy (`attention.cached_attention`)."""
    layers = {}
    for name, buffer in cache.items():
        heads_major = jnp.swapaxes(buffer, 2, 3)  # [L, B, K, S(, H)]
        layers[name] = tuple(heads_major[i] for i in range(heads_major.shape[0]))
    return layers


def is_per_layer(cache: dict) -> bool:
    return isinstance(cache["k"], (tuple, list))


def num_slots(cache: dict) -> int:
    """Slots of a stacked [L, B, S, K, H] or per-layer [B, K, S, H] cache (axis 2 of both)."""
    return (cache["k"][0] if is_per_layer(cache) else cache["k"]).shape[2]


def layer_of(cache: dict, layer: int) -> dict:
    """One layer's buffers of a per-layer cache."""
    return {name: buffers[layer] for name, buffers in cache.items()}


def write_layer(layer: dict, cache_index, k: jax.Array, v: jax.Array) -> dict:
    """One layer's heads-major buffers with k, v [B, L, kv_heads, head_dim] written at slots
    cache_index.. (in place: the caller reads the returned buffers, never the old ones)."""
    updates = {"k": k, "v": v}
    if "k_scale" in layer:
        updates["k"], updates["k_scale"] = quantize(k)
        updates["v"], updates["v_scale"] = quantize(v)
    out = {}
    for name, buffer in layer.items():
        update = jnp.swapaxes(updates[name], 1, 2).astype(buffer.dtype)  # [B, K, L(, H)]
        start = (0, 0, cache_index) + (0,) * (buffer.ndim - 3)
        out[name] = jax.lax.dynamic_update_slice(buffer, update, start)
    return out


def from_layers(layers: list[dict]) -> dict:
    """A per-layer cache from each layer's buffers (as `write_layer` returns them)."""
    return {name: tuple(layer[name] for layer in layers) for name in layers[0]}
