"""The sharded SFT step equals the one-device step; shardings follow the logical rules."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlaif_jax.parallel.mesh import ConfigError, make_mesh, mesh_shape
from rlaif_jax.parallel.sharding import DEFAULT_RULES, replicated_share
from rlaif_jax.engine import optim
from rlaif_jax.sft import loss as sft
from rlaif_jax.engine import state as state_lib
from rlaif_jax.engine.step import make_eval_fn, make_train_step
from tests.support import init_variables_fn, random_sft_batch, tiny_llama

LR = 1e-3
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
EIGHT = {"data": 2, "fsdp": 2, "tensor": 2}
OPTIM = dict(lr=LR, warmup_steps=0, schedule="constant", grad_clip=1.0, weight_decay=0.1)


def _setup(model, sizes, trainable="params/.*", accum=1, host_variables=None):
    devices = jax.devices()[:1] if sizes == ONE else None
    mesh = make_mesh(sizes, devices)
    tx, schedule = optim.make_optimizer(OPTIM, total_steps=10)
    init = init_variables_fn(model)
    layout = state_lib.plan_state(init, tx, mesh, DEFAULT_RULES, trainable)
    state, frozen = state_lib.state_from_variables(layout, host_variables, jax.random.PRNGKey(0))
    step = make_train_step(sft.make_sft_loss(model), layout, schedule, accum_steps=accum)
    return layout, state, frozen, step


def _host_variables(model):
    """Random variables as host numpy arrays, so every mesh starts from the same values."""
    return jax.device_get(nn.unbox(init_variables_fn(model)(jax.random.PRNGKey(1))))


def test_mesh_sizes_resolve_and_mismatch_is_named():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match="needs 12 devices but 8"):
        mesh_shape({"data": 3, "fsdp": 2, "tensor": 2}, 8)
    with pytest.raises(ConfigError, match="at most one axis"):
        mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_param_and_optimizer_shardings_follow_rules():
    model = tiny_llama()
    layout, state, frozen, _ = _setup(model, EIGHT, host_variables=_host_variables(model))
    specs = jax.tree.map(lambda a: a.sharding.spec, state.params["params"])
    assert specs["embed_tokens"] == P("tensor", "fsdp")  # (vocab, embed)
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")  # (embed, vocab)
    assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["self_attn"]["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["norm"]["scale"] == P(None)
    # Adam moments are sharded exactly like their params.
    adam = state.opt_state[1][0]
    assert jax.tree.map(lambda a: a.sharding.spec, adam.mu) == jax.tree.map(
        lambda a: a.sharding.spec, state.params)
    assert adam.mu["params"]["lm_head"]["kernel"].addressable_shards[0].data.shape == (32, 64)
    share, offenders = replicated_share(state.params, jax.tree.map(lambda a: a.sharding,
                                                                   state.params))
    assert 0 < share < 0.02 and all("scale" in path for path, _ in offenders)


def test_replicated_share_check_fails_with_named_params():
    model = tiny_llama()
    mesh = make_mesh(EIGHT)
    tx, _ = optim.make_optimizer(OPTIM, 10)
    rules = tuple((name, None) if not name.startswith("act_") else (name, axes)
                  for name, axes in DEFAULT_RULES)  # nothing sharded
    with pytest.raises(ConfigError, match="replicated.*embed_tokens|replicated.*kernel"):
        state_lib.plan_state(init_variables_fn(model), tx, mesh, rules, "params/.*")


def test_sharded_step_matches_one_device():
    """One device, whole batch vs (data 2, fsdp 2, tensor 2) with 2 accumulated micro-batches:
    the same loss, gradients and update (token-weighted accumulation is exact)."""
    accum = 2
    model = tiny_llama()
    host = _host_variables(model)
    batch = random_sft_batch(0)
    results = {}
    for name, sizes, acc in (("one", ONE, 1), ("eight", EIGHT, accum)):
        layout, state, frozen, step = _setup(model, sizes, accum=acc, host_variables=host)
        grad_fn = make_eval_fn(lambda v, b: jax.grad(
            lambda p: sft.make_sft_loss(model)(p, b, None)[0])(v), layout)
        grads = jax.device_get(grad_fn(state.params, frozen, batch))
        new_state, metrics = step(state, frozen, batch)
        results[name] = (grads, jax.device_get(metrics), jax.device_get(new_state.params))
    (g1, m1, p1), (g8, m8, p8) = results["one"], results["eight"]
    for key in ("loss", "accuracy", "grad_norm", "weight"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        # Sums of many tokens in another order: compare to the scale of each gradient.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    before = jax.tree.leaves(host)
    for a, b, p0 in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), before):
        np.testing.assert_allclose(a, b, atol=LR)
        assert np.abs(b - p0).max() > LR / 2  # the step did move the params


def test_lora_only_state_holds_only_the_adapter():
    model = tiny_llama(lora_rank=4)
    host = _host_variables(model)
    layout, state, frozen, step = _setup(model, EIGHT, trainable="lora/.*", host_variables=host)
    assert set(state.params) == {"lora"} and set(frozen) == {"params"}
    adam = state.opt_state[1][0]
    assert set(adam.mu) == {"lora"}  # no optimizer state for the frozen base
    base_before = jax.device_get(frozen)
    new_state, metrics = step(state, frozen, random_sft_batch(1))
    assert np.isfinite(metrics["loss"])
    # lora_b starts at zero and moves; the frozen base is untouched (and was not donated).
    moved = jax.device_get(new_state.params["lora"]["layers"]["mlp"]["up_proj"]["lora_b"])
    assert np.abs(moved).max() > 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), base_before)


def test_freeze_by_regex_splits_paths():
    tree = {"params": {"vision": {"w": 1}, "projector": {"w": 2}, "llm": {"w": 3}},
            "lora": {"llm": {"a": 4}}}
    train, frozen = optim.split_trainable(tree, r"params/.*", r"params/vision/.*")
    assert train == {"params": {"projector": {"w": 2}, "llm": {"w": 3}}}
    assert frozen == {"params": {"vision": {"w": 1}}, "lora": {"llm": {"a": 4}}}
    train, frozen = optim.split_trainable(tree, r"lora/.*|params/projector/.*")
    assert train == {"params": {"projector": {"w": 2}}, "lora": {"llm": {"a": 4}}}
    assert optim.merge_trees(train, frozen) == tree


def test_schedule_warmup_then_cosine_and_constant():
    cosine = optim.learning_rate_schedule(dict(lr=1.0, warmup_steps=10, schedule="cosine"), 110)
    assert float(cosine(0)) == 0.0 and abs(float(cosine(5)) - 0.5) < 1e-6
    assert abs(float(cosine(10)) - 1.0) < 1e-6 and abs(float(cosine(60)) - 0.5) < 1e-3
    assert float(cosine(110)) < 1e-6
    constant = optim.learning_rate_schedule(
        dict(lr=2.0, warmup_ratio=0.1, schedule="constant"), 100)
    assert abs(float(constant(5)) - 1.0) < 1e-6 and float(constant(90)) == 2.0
