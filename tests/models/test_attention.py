"""Causal block attention equals dense attention (outputs and gradients) on every real row, and
its custom backward equals jax's derivative of the same blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.models.attention import causal_block_attention, dot_product_attention
from rlaif_jax.models.llama import Llama, LlamaConfig


def test_block_attention_matches_dense_forward_and_gradients():
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2)
    dense, blocked = Llama(config), Llama(config.replace(attention_block=8))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 97, (3, 20)), jnp.int32)  # 20: blocks of 8, 8, 4
    mask = np.ones((3, 20), np.int32)
    mask[1, :5] = 0  # left padding: rows with no real key exist
    mask[2, 15:] = 0  # right padding
    mask = jnp.asarray(mask)
    params = dense.init(jax.random.PRNGKey(0), ids)["params"]

    def loss(model, p):
        out = model.apply({"params": p}, ids, attention_mask=mask).logits
        return jnp.sum(jnp.where(mask[..., None] > 0, out, 0.0) ** 2), out

    (loss_dense, out_dense), grad_dense = jax.value_and_grad(
        lambda p: loss(dense, p), has_aux=True)(params)
    (loss_blocked, out_blocked), grad_blocked = jax.value_and_grad(
        lambda p: loss(blocked, p), has_aux=True)(params)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(out_blocked)[real], np.asarray(out_dense)[real],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_blocked, loss_dense, rtol=1e-5)
    for g_b, g_d in zip(jax.tree.leaves(grad_blocked), jax.tree.leaves(grad_dense)):
        np.testing.assert_allclose(g_b, g_d, rtol=1e-4, atol=1e-5)
    # The blocked program really is a different one (fewer score FLOPs), not the dense one.
    cost = lambda m: jax.jit(lambda p: m.apply({"params": p}, ids).logits).lower(
        params).compile().cost_analysis()
    first = lambda c: (c[0] if isinstance(c, list) else c)["flops"]
    assert first(cost(blocked)) < first(cost(dense))


def _blocks_by_autodiff(q, k, v, mask, block):
    """The blocked attention as plain per-block dense attention (jax differentiates it)."""
    length = q.shape[1]
    return jnp.concatenate([
        dot_product_attention(q[:, s:s + block], k[:, :s + block], v[:, :s + block],
                              mask[..., s:s + block, :s + block])
        for s in range(0, length, block)], axis=1)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_block_attention_gradient_is_autodiffs_on_every_row(dtype, tolerance):
    """The custom backward (probabilities recomputed, none kept) against jax's derivative of the
    same blocks, with a cotangent on every row: padded rows with no key to attend to included."""
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(keys[0], (2, 20, 4, 16)).astype(dtype)
    k = jax.random.normal(keys[1], (2, 20, 2, 16)).astype(dtype)
    v = jax.random.normal(keys[2], (2, 20, 2, 16)).astype(dtype)
    cotangent = jax.random.normal(keys[3], q.shape).astype(dtype)
    token_mask = np.ones((2, 20), bool)
    token_mask[0, :6] = False  # rows 0-5 of row 0 see no real key
    causal = np.tril(np.ones((20, 20), bool))
    mask = jnp.asarray(causal[None, None] & token_mask[:, None, None, :])
    ours_out, ours_vjp = jax.vjp(lambda *a: causal_block_attention(*a, mask, 8), q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda *a: _blocks_by_autodiff(*a, mask, 8), q, k, v)
    assert ours_out.dtype == dtype
    f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(f32(ours_out), f32(ref_out),
                               atol=tolerance * np.abs(f32(ref_out)).max())
    for ours, ref, what in zip(ours_vjp(cotangent), ref_vjp(cotangent), "qkv"):
        assert ours.dtype == dtype
        np.testing.assert_allclose(f32(ours), f32(ref), atol=tolerance * np.abs(f32(ref)).max(),
                                   err_msg=f"d{what}")
