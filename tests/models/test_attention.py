"""Causal block attention equals dense attention (outputs and gradients) on every real row."""

import jax
import jax.numpy as jnp
import numpy as np

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
