"""The fused LM head + target log-probability: the same values and gradients as the logits
path, on both head layouts and in the SFT loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.models.llama import Llama
from rlaif_jax.models.target_logprobs import target_log_probs
from rlaif_jax.sft.loss import model_token_cross_entropy, token_cross_entropy
from tests.support import host_variables, random_sft_batch, tiny_llama, tiny_reward_model


def _plain(hidden, kernel, targets):
    logits = jnp.einsum("...h,hv->...v", hidden, kernel)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_values_and_gradients_equal_the_logits_path(dtype, tolerance):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, 5, 16)), dtype)
    kernel = jnp.asarray(rng.standard_normal((16, 40)) * 0.5, dtype)
    targets = jnp.asarray(rng.integers(0, 40, (3, 5)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)  # a non-uniform cotangent

    ours, is_top = target_log_probs(hidden, kernel, targets)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (hidden, kernel))
    ref, ref_top = _plain(*f32, targets)
    np.testing.assert_allclose(ours, ref, atol=tolerance * float(jnp.max(jnp.abs(ref))))
    if dtype == jnp.float32:
        np.testing.assert_array_equal(is_top, ref_top)
        # a row whose target is the top logit, so the check is not vacuous
        best = jnp.argmax(jnp.einsum("...h,hv->...v", *f32), axis=-1)
        assert bool(jnp.all(target_log_probs(hidden, kernel, best)[1]))

    grads = jax.grad(lambda h, k: jnp.sum(target_log_probs(h, k, targets)[0] * weights),
                     argnums=(0, 1))(hidden, kernel)
    ref_grads = jax.grad(lambda h, k: jnp.sum(_plain(h, k, targets)[0] * weights),
                         argnums=(0, 1))(*f32)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        np.testing.assert_allclose(got.astype(jnp.float32), want,
                                   atol=tolerance * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("tie", [False, True])
def test_llama_method_reads_its_own_head(tie):
    model = tiny_llama(tie_word_embeddings=tie)
    variables = host_variables(model)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 9)), jnp.int32)
    out = model.apply(variables, ids)
    ours, _ = model.apply(variables, out.last_hidden_state, ids, method=Llama.target_log_probs)
    ref = jnp.take_along_axis(jax.nn.log_softmax(out.logits), ids[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_sft_loss_through_the_fused_head_equals_the_logits_path():
    """Sums and parameter gradients of the SFT loss (ignored labels, padding) on a video LLM."""
    model = tiny_reward_model(reward_head=False)
    variables = host_variables(model)
    batch = {k: jnp.asarray(v) for k, v in random_sft_batch(2, batch=4, length=12,
                                                            vocab=96).items()}

    def fused(v):
        return model_token_cross_entropy(model, v, batch)

    def plain(v):
        logits = model.apply(v, batch["input_ids"], batch["attention_mask"]).logits
        return token_cross_entropy(logits, batch["labels"])

    got, want = fused(variables), plain(variables)
    assert float(want["weight"]) > 0 and float(want["accuracy"]) < float(want["weight"])
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    grads = jax.grad(lambda v: fused(v)["loss"])(variables)
    ref_grads = jax.grad(lambda v: plain(v)["loss"])(variables)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5 * max(float(jnp.max(jnp.abs(r))), 1e-3),
                                   err_msg=jax.tree_util.keystr(path))
