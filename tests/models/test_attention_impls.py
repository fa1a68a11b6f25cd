"""Every LlamaConfig.attention_impl equals dense attention on left- and right-padded rows,
forward and gradients, within 1e-4 * max|dense| in float32. The Pallas kernels (splash for TPU,
the Triton flash kernel for GPU) run in the Pallas interpreter; the cuDNN path's padding logic
(rows shifted to the front, sequence lengths) runs through jax.nn.dot_product_attention's XLA
implementation, the same call that uses cuDNN on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.models.attention import dot_product_attention
from rlaif_jax.models.fused_attention import causal_attention, resolve, shifted_attention
from rlaif_jax.models.llama import Llama, LlamaConfig, attention_mask_4d

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 3, 24, 4, 2, 16


def _token_mask():
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[0, :7] = 0  # a left-padded prompt
    mask[1, 17:] = 0  # a right-padded response
    mask[2, :3] = 0  # prompt padding on the left, response padding on the right
    mask[2, 20:] = 0
    return jnp.asarray(mask)


def _inputs():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (BATCH, LENGTH, HEADS, HEAD_DIM))
    k = jax.random.normal(keys[1], (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(keys[2], (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    cotangent = jax.random.normal(keys[3], (BATCH, LENGTH, HEADS, HEAD_DIM))
    return q, k, v, cotangent


def _value_and_grads(attend, q, k, v, cotangent, token_mask):
    real = token_mask.astype(bool)[:, :, None, None]

    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(jnp.where(real, out * cotangent, 0.0)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


IMPLS = {
    "xla": dict(impl="xla"),
    "blocked": dict(impl="blocked", block=8),
    "splash": dict(impl="splash", interpret=True),
    "pallas_gpu": dict(impl="pallas_gpu", interpret=True),
}


@pytest.mark.parametrize("name", [*IMPLS, "cudnn_padding_via_xla"])
def test_implementation_matches_dense_forward_and_gradients(name):
    q, k, v, cotangent = _inputs()
    token_mask = _token_mask()
    slots = jnp.arange(LENGTH)
    mask = attention_mask_4d(token_mask, slots, slots)
    if name == "cudnn_padding_via_xla":
        attend = lambda q, k, v: shifted_attention(q, k, v, token_mask, implementation="xla")
    else:
        attend = lambda q, k, v: causal_attention(q, k, v, token_mask, mask, **IMPLS[name])
    dense_out, dense_grads = _value_and_grads(
        lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v, cotangent, token_mask)
    out, grads = jax.jit(lambda q, k, v: _value_and_grads(attend, q, k, v, cotangent,
                                                          token_mask))(q, k, v)
    real = np.asarray(token_mask, bool)
    scale = np.max(np.abs(np.asarray(dense_out)[real]))
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(dense_out)[real],
                               atol=1e-4 * scale, rtol=0)
    assert np.all(np.isfinite(np.asarray(out)))  # padded rows too: they feed later layers
    for grad, dense_grad, what in zip(grads, dense_grads, "qkv"):
        grad_scale = np.max(np.abs(np.asarray(dense_grad)))
        np.testing.assert_allclose(np.asarray(grad), np.asarray(dense_grad),
                                   atol=1e-4 * grad_scale, rtol=0, err_msg=f"d{what}")


def test_a_model_with_splash_equals_the_dense_model():
    """The switch reaches every layer of a full forward and its gradients."""
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1)
    dense = Llama(config.replace(attention_impl="xla"))
    splash = Llama(config.replace(attention_impl="splash", attention_interpret=True))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 10)), jnp.int32)
    token_mask = jnp.asarray(np.arange(10)[None] >= np.array([[0], [4]]), jnp.int32)
    params = dense.init(jax.random.PRNGKey(0), ids)["params"]

    def loss(model, params):
        logits = model.apply({"params": params}, ids, attention_mask=token_mask).logits
        return jnp.sum(jnp.where(token_mask[..., None] > 0, logits, 0.0) ** 2)

    dense_loss, dense_grads = jax.jit(jax.value_and_grad(lambda p: loss(dense, p)))(params)
    splash_loss, splash_grads = jax.jit(jax.value_and_grad(lambda p: loss(splash, p)))(params)
    np.testing.assert_allclose(splash_loss, dense_loss, rtol=1e-5)
    for grad, dense_grad in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(grad, dense_grad, atol=1e-4 * np.max(np.abs(dense_grad)))


def test_auto_picks_per_platform_and_bad_names_fail():
    assert resolve("auto", jnp.bfloat16, 128, 0, platform="tpu") == "splash"
    assert resolve("auto", jnp.bfloat16, 128, 0, platform="gpu") == "cudnn"
    assert resolve("auto", jnp.float32, 128, 0, platform="gpu") == "xla"  # cuDNN: bf16/fp16 only
    assert resolve("auto", jnp.float32, 128, 128, platform="cpu") == "blocked"
    assert resolve("auto", jnp.float32, 128, 0, platform="cpu") == "xla"
    assert resolve("pallas_gpu", jnp.float32, 128, 0, platform="cpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="attention_impl"):
        LlamaConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block > 0"):
        LlamaConfig(attention_impl="blocked")
    if jax.default_backend() != "gpu":
        q, k, v, _ = _inputs()
        with pytest.raises(ValueError, match="needs a GPU"):
            causal_attention(q, k, v, _token_mask(), None, "cudnn")
