"""Starting a stage from an earlier stage's checkpoint (stage 4, policy init, of docs/method.md).

- reverse task, text LLaMA: a LoRA r 4 stage, then a stage from it with its own r 8 adapter:
  the earlier adapter is merged into the base, the new one starts at zero, so the new stage's
  model starts out computing exactly what the earlier stage's model computed;
- the `policy_init_smoke` preset from the SFT smoke workdir: a new r 64 adapter is the only
  trainable variable, over the SFT stage's trained parameters.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import sft as sft_configs
from rlaif_jax.checkpoints.orbax_io import read_step_dir, resolve_checkpoint
from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.engine.loop import LoopOptions, run_stage
from rlaif_jax.engine.model_init import build_model, starting_variables
from rlaif_jax.engine.optim import merge_trees
from rlaif_jax.sft.stage import build_sft_stage
from rlaif_jax.engine.state import plan_state
from rlaif_jax.engine import optim
from tests.support import override


def _config(preset, **changes):
    return override(sft_configs.get_config(preset), **changes)


def _lora_leaves(tree):
    return jax.tree.leaves(tree["lora"])


def test_new_adapter_over_merged_earlier_adapter(tmp_path):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])  # compiles fastest
    first = _config("reverse", workdir=str(tmp_path), num_steps=6, trainable="lora/.*",
                    max_replicated_share=1.0,
                    **{"model.lora.rank": 4, "model.lora.alpha": 8.0, "optim.lr": 3e-2})
    no_eval = dataclasses.replace(build_sft_stage(first, mesh), evaluate=None)
    run_stage(no_eval, str(tmp_path / "sft"),
              LoopOptions(checkpoint_every=6, keep_checkpoints=3, async_checkpoints=False,
                          log_every=10, eval_every=0, tensorboard=False, progress=False))
    second = _config("reverse", workdir=str(tmp_path), stage="policy_init", init="stage:sft",
                     trainable="lora/.*", max_replicated_share=1.0, **{"model.lora.rank": 8, "model.lora.alpha": 16.0})
    stage = build_sft_stage(second, mesh)
    state, frozen = stage.fresh_state()
    assert set(state.params) == {"lora"}
    assert {a.shape[-1] for a in jax.tree.leaves(state.params["lora"]) if a.ndim == 3} >= {8}
    assert all(not np.any(np.asarray(leaf)) for path, leaf in
               jax.tree_util.tree_flatten_with_path(state.params["lora"])[0]
               if "lora_b" in optim.path_str(path))

    # The earlier stage's model: its base with its trained r 4 adapter, kept as it is.
    model_a, init_a = build_model(first)
    layout_a = plan_state(init_a, optim.make_optimizer(first.optim, 6)[0], mesh, (),
                          first.trainable, max_replicated_share=1.0)
    step_dir = resolve_checkpoint(str(tmp_path / "sft"))[1]
    variables_a = starting_variables(step_dir, layout_a, init_a, first.seed, "continue")
    trained_a = read_step_dir(step_dir)[0]["lora"]
    assert any(np.any(np.asarray(leaf)) for path, leaf in
               jax.tree_util.tree_flatten_with_path(trained_a)[0]
               if "lora_b" in optim.path_str(path))  # the earlier adapter did train
    model_b, _ = build_model(second)
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 12, (4, 12)), jnp.int32)
    logits_a = jax.jit(lambda v: model_a.apply(v, input_ids=ids).logits)(variables_a)
    logits_b = jax.jit(lambda v: model_b.apply(v, input_ids=ids).logits)(
        merge_trees(state.params, frozen))
    np.testing.assert_allclose(logits_b, logits_a, atol=2e-5 * float(jnp.abs(logits_a).max()))
    base_a = jax.jit(lambda p: model_a.apply({"params": p}, input_ids=ids).logits)(
        variables_a["params"])
    assert float(jnp.abs(base_a - logits_a).max()) > 1e-3  # the merge mattered


def test_policy_init_smoke_starts_from_the_sft_stage(smoke_workdir):
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    config = _config("policy_init_smoke", workdir=smoke_workdir)
    stage = build_sft_stage(config, mesh)
    state, frozen = stage.fresh_state()
    assert set(state.params) == {"lora"}  # only the new adapter trains
    ranks = {leaf.shape[-1] for path, leaf in
             jax.tree_util.tree_flatten_with_path(state.params["lora"])[0]
             if "lora_a" in optim.path_str(path)}
    assert ranks == {64} and stage.meta["lora"] == {
        "rank": 64, "alpha": 16.0, "targets": stage.meta["lora"]["targets"]}
    sft_params = read_step_dir(resolve_checkpoint(os.path.join(smoke_workdir, "sft"))[1])[0]
    flat_sft = dict(jax.tree_util.tree_flatten_with_path(sft_params["params"])[0])
    flat_now = jax.tree_util.tree_flatten_with_path(jax.device_get(frozen["params"]))[0]
    assert len(flat_now) == len(flat_sft)
    for path, value in flat_now:
        np.testing.assert_array_equal(value, flat_sft[path], err_msg=optim.path_str(path))
    assert stage.meta["init"] == os.path.join(smoke_workdir, "sft")
