"""LoRA inside the layers: exact base at init, merge only for export, adapter-only gradients,
several named adapters over one base with no copy of it."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlaif_jax
from rlaif_jax.models.lora import (LoraConfig, NamedAdapters, init_lora, merge_lora,
                                   with_lora_config)
from tests.support import left_padded_batch, random_frames, save_tiny_hf_llama, save_tiny_hf_llava

LORA = LoraConfig(rank=4, alpha=8.0)
IDS, MASK = left_padded_batch(97, lengths=[8, 5], total=8, seed=11)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("llama"))
    save_tiny_hf_llama(directory)
    model, params = rlaif_jax.from_pretrained(directory, lora=LORA)
    return model, params


@pytest.fixture(scope="module")
def logits_fn(llama):
    model, _ = llama

    @jax.jit
    def logits(variables):
        return model.apply(variables, IDS, attention_mask=MASK).logits

    return logits


def _perturbed(adapter, seed=0):
    """Non-zero B (a trained adapter), so the adapter really changes the model."""
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [leaf + 0.05 * jax.random.normal(k, leaf.shape)
                                     for leaf, k in zip(leaves, keys)])


def _kernel_shapes(params, targets=LORA):
    """Shapes (stacked and per layer) of every LoRA-targeted base kernel."""
    shapes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "kernel" and targets.applies_to(names[-2]):
            shapes.update({tuple(leaf.shape), tuple(leaf.shape[1:])})
    return shapes


def _ops_producing(jaxpr, shapes):
    """Primitives anywhere in `jaxpr` (scan bodies included) whose output has one of `shapes`."""
    found = []
    for eqn in jaxpr.eqns:
        found += [eqn.primitive.name for v in eqn.outvars
                  if tuple(getattr(v.aval, "shape", ())) in shapes]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _ops_producing(getattr(inner, "jaxpr", inner), shapes)
    return found


def test_fresh_adapter_gives_the_base_logits_exactly(llama, logits_fn):
    model, params = llama
    adapter = init_lora(model, jax.random.PRNGKey(0), IDS)
    layers = adapter["layers"]
    assert set(layers["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layers["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert layers["self_attn"]["q_proj"]["lora_a"].shape == (3, 64, 4)  # stacked like the layers
    assert all(not np.any(b) for b in jax.tree.leaves(adapter) if b.shape[-2] == 4)  # B = 0
    assert all(np.any(a) for a in jax.tree.leaves(adapter) if a.shape[-1] == 4)  # A random
    np.testing.assert_array_equal(logits_fn({"params": params, "lora": adapter}),
                                  logits_fn({"params": params}))


def test_targets_are_a_regex_over_projection_names(llama):
    model, _ = llama
    only_qv = with_lora_config(model, LoraConfig(rank=2, targets="(q_proj|v_proj)"))
    adapter = jax.eval_shape(lambda k: only_qv.init(k, IDS)["lora"], jax.random.PRNGKey(0))
    assert set(adapter["layers"]["self_attn"]) == {"q_proj", "v_proj"}
    assert "mlp" not in adapter["layers"]
    assert adapter["layers"]["self_attn"]["q_proj"]["lora_b"].value.shape == (3, 2, 64)


def test_merged_export_equals_unmerged_apply(llama, logits_fn, tmp_path):
    model, params = llama
    adapter = _perturbed(init_lora(model, jax.random.PRNGKey(1), IDS))
    unmerged = logits_fn({"params": params, "lora": adapter})
    assert not np.allclose(unmerged, logits_fn({"params": params}), atol=1e-3)
    merged = merge_lora(params, adapter, LORA)
    np.testing.assert_allclose(logits_fn({"params": merged}), unmerged, rtol=1e-5, atol=1e-5)
    rlaif_jax.save_pretrained(model, params, str(tmp_path), lora=adapter)
    exported, exported_params = rlaif_jax.from_pretrained(str(tmp_path))
    assert exported.config.lora.rank == 0
    # (The LoRA-configured model applied without an adapter is the exported model.)
    np.testing.assert_allclose(logits_fn({"params": exported_params}), unmerged, rtol=1e-5,
                               atol=1e-5)


def test_only_adapter_params_receive_gradients(llama):
    model, params = llama
    adapter = init_lora(model, jax.random.PRNGKey(2), IDS)

    def loss(base, lora):
        logits = model.apply({"params": base, "lora": lora}, IDS, attention_mask=MASK).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 5])

    grads = jax.jit(jax.grad(loss, argnums=1))(params, adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    # With B = 0 only B gets a gradient at the first step; every B does.
    assert all(np.any(g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
               if str(path[-1].key) == "lora_b")
    # The frozen base gets no weight gradient at all: nothing in the backward pass has the shape
    # of a targeted kernel (a base weight gradient would be one such matmul per projection).
    shapes = _kernel_shapes(params)
    adapter_only = jax.make_jaxpr(jax.grad(loss, argnums=1))(params, adapter).jaxpr
    assert _ops_producing(adapter_only, shapes) == []
    both = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, adapter).jaxpr
    assert "dot_general" in _ops_producing(both, shapes)  # the check can fail


def test_named_adapters_share_one_base_without_copying_it(llama, logits_fn):
    model, params = llama
    jax.block_until_ready(logits_fn({"params": params}))  # compile before counting bytes
    gc.collect()
    live = lambda: sum(a.nbytes for a in jax.live_arrays())  # noqa: E731
    base_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    before = live()

    policy = _perturbed(init_lora(model, jax.random.PRNGKey(3), IDS), seed=1)
    reference = _perturbed(init_lora(model, jax.random.PRNGKey(4), IDS), seed=2)
    low_alpha = LoraConfig(rank=4, alpha=2.0)
    bank = NamedAdapters(params).add("policy", policy).add("reference", reference, low_alpha)
    outs = [bank.apply(model, name, IDS, attention_mask=MASK).logits
            for name in ("policy", "reference", None)]
    jitted = jax.jit(lambda b: b.apply(model, "policy", IDS, attention_mask=MASK).logits)(bank)
    jax.block_until_ready(outs + [jitted])
    gc.collect()
    grown = live() - before
    expected = sum(a.nbytes for a in jax.tree.leaves((policy, reference, outs, jitted)))
    assert grown - expected < 0.05 * base_bytes, (grown, expected, base_bytes)
    assert bank.variables("policy")["params"] is params is bank.variables("reference")["params"]

    np.testing.assert_allclose(outs[0], logits_fn({"params": params, "lora": policy}), atol=1e-5)
    np.testing.assert_allclose(jitted, outs[0], atol=1e-5)
    np.testing.assert_allclose(outs[2], logits_fn({"params": params}), atol=1e-5)
    # The reference adapter runs with its own alpha: the same as merging with that scale.
    merged = merge_lora(params, reference, low_alpha)
    np.testing.assert_allclose(outs[1], logits_fn({"params": merged}), rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[0], outs[1], atol=1e-3)
    with pytest.raises(KeyError, match="no adapter 'value'"):
        bank.variables("value")

    # Nor does the traced program build W + BA: no op outputs a targeted kernel's shape, which a
    # merged forward does.
    shapes = _kernel_shapes(params)
    forward = jax.make_jaxpr(lambda b: b.apply(model, "policy", IDS, attention_mask=MASK).logits)
    assert _ops_producing(forward(bank).jaxpr, shapes) == []
    merged_forward = jax.make_jaxpr(
        lambda p, a: model.apply({"params": merge_lora(p, a, LORA)}, IDS, attention_mask=MASK))
    assert "add" in _ops_producing(merged_forward(params, policy).jaxpr, shapes)


def test_video_llm_adapter_lives_in_the_llm_and_exports_merged(tmp_path):
    directory = str(tmp_path / "llava")
    save_tiny_hf_llava(directory, image_token_index=96)
    model, params = rlaif_jax.from_pretrained(
        directory, num_frames=2, llm={"lora": {"rank": 4, "alpha": 16.0}})
    ids = np.array([[3, 96, 5, 6, 7], [0, 4, 96, 8, 9]], np.int32)
    mask = (ids != 0).astype(np.int32)
    frames = random_frames((2, 2, 32, 32, 3), seed=12)
    adapter = init_lora(model, jax.random.PRNGKey(5), ids)
    assert set(adapter) == {"llm"}  # not on the vision tower, whose q/k/v share the names

    @jax.jit
    def logits(variables):
        return model.apply(variables, ids, mask, frames=frames).logits

    base = logits({"params": params})
    np.testing.assert_array_equal(logits({"params": params, "lora": adapter}), base)
    adapter = _perturbed(adapter)
    unmerged = logits({"params": params, "lora": adapter})
    assert not np.allclose(unmerged, base, atol=1e-3)
    rlaif_jax.save_pretrained(model, params, str(tmp_path / "merged"), lora=adapter)
    exported, exported_params = rlaif_jax.from_pretrained(str(tmp_path / "merged"))
    assert exported.config.llm.lora.rank == 0
    np.testing.assert_allclose(logits({"params": exported_params}), unmerged, rtol=1e-5,
                               atol=1e-5)
