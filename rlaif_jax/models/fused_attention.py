"""Causal self-attention of a whole sequence, by the implementation `LlamaConfig.attention_impl`
names. Used by every full-sequence forward (the SFT, RM and PPO train steps, scoring, prefill);
a decode step keeps the XLA path (models/attention.py: one query a row, memory-bound).

- `xla`: dense scores in XLA (`dot_product_attention`).
- `blocked`: query blocks that skip the masked upper triangle (`causal_block_attention`,
  `attention_block` tokens a block).
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused flash
  attention (GPU only; bfloat16 / float16, head_dim <= 256 and a multiple of 8). Padding goes in
  as sequence lengths, so each row's real tokens are shifted to the front first.
- `splash`: the Pallas TPU splash-attention kernel (causal mask + segment ids).
- `pallas_gpu`: the Pallas GPU flash-attention kernel (`ops.gpu.attention.mha`, causal + segment
  ids).
- `auto`: per platform (`resolve`): splash on TPU, cuDNN on GPU where it applies, else blocked
  when `attention_block` > 0, else xla.

Padding is exact for every real token (the rows of a train batch are left-padded prompts
followed by right-padded responses): the kernels get segment id 1 on real tokens and 0 on
padding, so a real query attends to exactly the real keys at or before it, as the dense mask
says. Padded queries attend to other padding (their outputs are unused; they stay finite so no
NaN reaches a real row through a masked key). The Pallas kernels run on CPU with
`attention_interpret=True` (the parity tests).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rlaif_jax.models.attention import causal_block_attention, dot_product_attention

IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "splash", "pallas_gpu")
KERNEL_BLOCK = 128  # the Pallas kernels' tile along the sequence (splash needs multiples of 128)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve(impl: str, dtype, head_dim: int, attention_block: int,
            platform: Optional[str] = None) -> str:
    """The implementation `impl` stands for on `platform` (default: jax's default backend)."""
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and cudnn_supports(dtype, head_dim):
        return "cudnn"
    return "blocked" if attention_block > 0 else "xla"


def cudnn_supports(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and head_dim <= 256 \
        and head_dim % 8 == 0


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, token_mask: jax.Array,
                     mask: jax.Array, impl: str, block: int = 0,
                     interpret: bool = False) -> jax.Array:
    """q [B, T, N, H], k / v [B, T, K, H] (N a multiple of K, RoPE applied), token_mask [B, T]
    (1 = real token), mask [B, 1, T, T] (the dense causal & real-key mask, for xla / blocked).
    Returns [B, T, N, H] in q's dtype; rows of padding hold unspecified finite values."""
    if impl == "xla":
        return dot_product_attention(q, k, v, mask=mask)
    if impl == "blocked":
        return causal_block_attention(q, k, v, mask, block)
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError("attention_impl='cudnn' needs a GPU; use 'auto', 'xla' or 'blocked'")
        return shifted_attention(q, k, v, token_mask, implementation="cudnn")
    if impl == "splash":
        return _over_mesh(_splash, q, k, v, token_mask, interpret=interpret)
    if impl == "pallas_gpu":
        return _over_mesh(_pallas_gpu, q, k, v, token_mask, interpret=interpret)
    raise ValueError(f"attention_impl={impl!r}: expected one of {IMPLEMENTATIONS}")


def shifted_attention(q, k, v, token_mask, implementation: Optional[str]):
    """`jax.nn.dot_product_attention` with padding given as sequence lengths: each row is
    rotated so that its real tokens (one contiguous run, as in left-padded prompt + right-padded
    response rows) start at 0, attended causally up to its length, and rotated back. RoPE is
    already in q and k, so the rotation changes no score. `implementation`: 'cudnn', or None /
    'xla' (the same path on any platform: what the CPU tests check)."""
    length = q.shape[1]
    token_mask = token_mask.astype(bool)
    first = jnp.argmax(token_mask, axis=1)  # the first real token (0 for a row of padding)
    lengths = jnp.maximum(jnp.sum(token_mask, axis=1), 1).astype(jnp.int32)
    slots = jnp.arange(length)
    to_front = (slots[None] + first[:, None]) % length
    back = (slots[None] - first[:, None]) % length
    take = lambda x, index: jnp.take_along_axis(x, index[:, :, None, None], axis=1)
    out = jax.nn.dot_product_attention(
        take(q, to_front), take(k, to_front), take(v, to_front), is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=implementation)
    out = take(out, back)
    # Padded queries may come back as anything the kernel leaves there: make them zeros.
    return jnp.where(token_mask[:, :, None, None], out, jnp.zeros((), out.dtype))


def _segment_ids(token_mask: jax.Array, padded_length: int) -> jax.Array:
    """int32 [B, padded_length]: 1 on real tokens, 0 on padding and on the kernel's tail."""
    ids = token_mask.astype(jnp.int32)
    return jnp.pad(ids, ((0, 0), (0, padded_length - ids.shape[1])))


def _padded_length(length: int) -> int:
    return -(-length // KERNEL_BLOCK) * KERNEL_BLOCK


def _pad_sequence(x: jax.Array, padded_length: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, padded_length - x.shape[1]), (0, 0), (0, 0)))


def _splash(q, k, v, token_mask, interpret: bool):
    # The TPU kernels are an optional, heavy import (Mosaic lowering rules): only when chosen.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, head_dim = q.shape
    padded = _padded_length(length)
    segments = _segment_ids(token_mask, padded)
    causal = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * heads)
    kernel = splash.make_splash_mha(causal, head_shards=1, q_seq_shards=1, interpret=interpret,
                                    block_sizes=_splash_blocks(splash, padded))
    # splash works on one example [heads, length, head_dim] and does not scale the scores.
    to_heads_first = lambda x: jnp.transpose(_pad_sequence(x, padded), (0, 2, 1, 3))
    scaled_q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    one_row = lambda q1, k1, v1, s1: kernel(q1, k1, v1, splash.SegmentIds(q=s1, kv=s1))
    out = jax.vmap(one_row)(to_heads_first(scaled_q), to_heads_first(k), to_heads_first(v),
                            segments)
    return jnp.transpose(out, (0, 2, 1, 3))[:, :length].astype(q.dtype)


def _splash_blocks(splash, padded: int):
    """The largest of 512 / 256 / 128 that tiles the padded sequence, in every pass."""
    block = next(b for b in (512, 256, KERNEL_BLOCK) if padded % b == 0)
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)


def _pallas_gpu(q, k, v, token_mask, interpret: bool):
    # Triton lowering rules: imported only when this implementation is chosen.
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    batch, length, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    padded = _padded_length(length) if length > KERNEL_BLOCK else length
    # The kernel has no grouped heads: each query head gets its key/value head's copy.
    k, v = (jnp.repeat(x, groups, axis=2) if groups > 1 else x for x in (k, v))
    out = gpu_attention.mha(_pad_sequence(q, padded), _pad_sequence(k, padded),
                            _pad_sequence(v, padded), _segment_ids(token_mask, padded),
                            sm_scale=head_dim ** -0.5, causal=True, interpret=interpret)
    return out[:, :length].astype(q.dtype)


def _over_mesh(kernel, q, k, v, token_mask, interpret: bool):
    """A Pallas kernel sees whole arrays: under a mesh, run it per shard (rows over the batch
    axes, heads over 'tensor', as the activations' logical rules place them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, token_mask, interpret=interpret)
    heads = nn.logical_to_mesh_axes(("act_batch", None, "act_heads", None))
    rows = PartitionSpec(heads[0], None)
    return jax.shard_map(lambda *a: kernel(*a, interpret=interpret), mesh=mesh,
                         in_specs=(heads, heads, heads, rows), out_specs=heads,
                         check_vma=False)(q, k, v, token_mask)
