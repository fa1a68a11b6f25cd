"""LLaMA decoder: float32 parity with transformers' LlamaForCausalLM, and HF round trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import rlaif_jax
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from tests.support import assert_close_scaled, hf_logits, left_padded_batch, save_tiny_hf_llama

VARIANTS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "rope_theta_and_linear_scaling": {
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "tied_embeddings": {"tie_word_embeddings": True},
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    models = {}
    for name, overrides in VARIANTS.items():
        directory = str(tmp_path_factory.mktemp(name))
        models[name] = (directory, save_tiny_hf_llama(directory, **overrides))
    return models


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_on_left_padded_batch(hf_models, variant):
    directory, hf_model = hf_models[variant]
    model, params = rlaif_jax.from_pretrained(directory)
    ids, mask = left_padded_batch(97, lengths=[11, 7, 3], total=11)
    ours = model.apply({"params": params}, ids, attention_mask=mask).logits
    ref = hf_logits(hf_model, ids, mask)
    assert_close_scaled(ours, ref, mask)


def test_config_reads_theta_and_scaling(hf_models):
    model, _ = rlaif_jax.from_pretrained(hf_models["rope_theta_and_linear_scaling"][0])
    assert model.config.rope_theta == 5e5
    assert model.config.rope_scaling_factor == 2.0
    model, _ = rlaif_jax.from_pretrained(hf_models["gqa"][0])
    assert model.config.kv_heads == 2


@pytest.mark.parametrize("variant", ["gqa", "tied_embeddings"])
def test_round_trip_through_transformers(hf_models, tmp_path, variant):
    directory, _ = hf_models[variant]
    model, params = rlaif_jax.from_pretrained(directory)
    # Perturb so the exported weights are ours, not a copy of the files we read.
    params = jax.tree.map(lambda p: p * 1.01 + 0.001, params)
    rlaif_jax.save_pretrained(model, params, str(tmp_path))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
    ids, mask = left_padded_batch(97, lengths=[9, 5], total=9, seed=1)
    ours = model.apply({"params": params}, ids, attention_mask=mask).logits
    assert_close_scaled(ours, hf_logits(reloaded, ids, mask), mask)


def test_sharded_export_writes_index_and_reloads(hf_models, tmp_path):
    model, params = rlaif_jax.from_pretrained(hf_models["mha"][0])
    rlaif_jax.checkpoints.hf.save_llama(model.config, params, str(tmp_path), max_shard_bytes=40_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    model2, params2 = rlaif_jax.from_pretrained(str(tmp_path))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("scan_layers,remat_policy", [(False, "none"), (True, "full"),
                                                       (False, "dots"), (True, "dots_no_batch")])
def test_scan_and_remat_do_not_change_logits_or_grads(hf_models, scan_layers, remat_policy):
    directory, _ = hf_models["gqa"]
    ref_model, ref_params = rlaif_jax.from_pretrained(directory)
    model, params = rlaif_jax.from_pretrained(
        directory, scan_layers=scan_layers, remat_policy=remat_policy)
    if not scan_layers:
        assert "layers_0" in params and "layers" not in params
    ids, mask = left_padded_batch(97, lengths=[8, 6], total=8, seed=2)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, ids, attention_mask=mask).logits ** 2)

    np.testing.assert_allclose(
        model.apply({"params": params}, ids, attention_mask=mask).logits,
        ref_model.apply({"params": ref_params}, ids, attention_mask=mask).logits,
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(loss, 1)(model, params)["norm"]["scale"],
                               jax.grad(loss, 1)(ref_model, ref_params)["norm"]["scale"],
                               rtol=1e-4, atol=1e-7)


def test_bf16_compute_stays_close_to_fp32(hf_models):
    directory, _ = hf_models["mha"]
    model32, params = rlaif_jax.from_pretrained(directory)
    model16, params16 = rlaif_jax.from_pretrained(directory, dtype="bfloat16")
    assert jax.tree.leaves(params16)[0].dtype == jnp.float32  # fp32 master weights
    ids, mask = left_padded_batch(97, lengths=[6], total=6)
    out16 = model16.apply({"params": params16}, ids, attention_mask=mask).logits
    out32 = model32.apply({"params": params}, ids, attention_mask=mask).logits
    assert out16.dtype == jnp.float32
    assert np.max(np.abs(out16 - out32)) < 0.05 * np.max(np.abs(out32))


def _rewrite_checkpoint(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


@pytest.mark.parametrize("problem,edit,named", [
    ("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "model.layers.1.mlp.up_proj.weight"),
    ("extra", lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}),
     "model.layers.0.self_attn.extra.weight"),
    ("misshaped", lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}),
     "model.norm.weight"),
])
def test_bad_checkpoint_names_the_tensor(hf_models, tmp_path, problem, edit, named):
    _rewrite_checkpoint(hf_models["mha"][0], str(tmp_path), edit)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        rlaif_jax.from_pretrained(str(tmp_path))


def test_cached_decoding_matches_full_forward(hf_models):
    """Prefill into a KV cache then one token at a time: the same logits as one full pass."""
    directory, _ = hf_models["gqa"]
    model, params = rlaif_jax.from_pretrained(directory)
    from rlaif_jax.models.llama import init_cache, positions_from_mask
    ids, mask = left_padded_batch(97, lengths=[7, 4], total=7, seed=3)
    full = model.apply({"params": params}, ids, attention_mask=mask).logits
    prefix = 4
    cache = init_cache(model.config, 2, 7)
    positions = positions_from_mask(jnp.asarray(mask))
    cache_mask = jnp.zeros((2, 7), jnp.int32).at[:, :prefix].set(mask[:, :prefix])
    out = model.apply({"params": params}, ids[:, :prefix], attention_mask=cache_mask,
                      position_ids=positions[:, :prefix], cache=cache, cache_index=0)
    steps = [out.logits]
    cache = out.cache
    for t in range(prefix, 7):
        cache_mask = cache_mask.at[:, t].set(mask[:, t])
        out = model.apply({"params": params}, ids[:, t:t + 1], attention_mask=cache_mask,
                          position_ids=positions[:, t:t + 1], cache=cache, cache_index=t)
        cache = out.cache
        steps.append(out.logits)
    assert_close_scaled(jnp.concatenate(steps, axis=1), full, mask)
