"""The real presets' parameter layouts on 8 devices, from abstract shapes only (nothing of 7B size
is materialised): `configs/ppo.py:vicuna7b` (7B video policy + reference adapter, 13B RM and value
model), `configs/sft.py:vicuna7b` / `vicuna13b` and `configs/rm.py:vicuna13b` (its 13B backbone
is sft.py's vicuna13b, as the RM stage reads it from that checkpoint).

Each must pass the start-up check with its own `max_replicated_share` (2%) on an fsdp-only mesh
and on an fsdp x tensor mesh, and its big matrices must be laid out as the rules say.
"""

import math

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import ppo as ppo_configs
from configs import rm as rm_configs
from configs import sft as sft_configs
from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig
from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.parallel.sharding import make_rules, replicated_share
from rlaif_jax.engine import model_init
from rlaif_jax.engine.optim import merge_trees
from rlaif_jax.ppo.actor_critic import ActorCritic
from rlaif_jax.engine.state import plan_state

MESHES = {"fsdp8": dict(data=1, fsdp=8, tensor=1), "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2)}


def _ppo_vicuna7b():
    config = ppo_configs.get_config("vicuna7b")
    policy = VideoLLM(VideoLLMConfig.from_dict(config.model))
    critic = VideoLLM(VideoLLMConfig.from_dict(config.critic_model))
    models = ActorCritic(policy=policy, critic=critic,
                         critic_shares_base=config.critic_shares_base)
    return config, models.init_variables, models.trainable_regex(), ""


def _sft(preset):
    config = sft_configs.get_config(preset)
    with config.unlocked():
        config.init = ""  # the architecture of config.model (policy_init_7b names stage:sft)
    _, init = model_init.build_model(config)
    return config, init, config.trainable, config.frozen


def _rm_vicuna13b():
    config = rm_configs.get_config("vicuna13b")
    backbone = sft_configs.get_config("vicuna13b")  # what the RM's init checkpoint holds
    _, init = model_init.model_from_config(backbone.model_kind, backbone.model, reward_head=True,
                                           lora=config.lora.to_dict())
    return config, init, config.trainable, config.frozen


PRESETS = {"ppo:vicuna7b": _ppo_vicuna7b, "sft:vicuna7b": lambda: _sft("vicuna7b"),
           "sft:vicuna13b": lambda: _sft("vicuna13b"),
           "sft:policy_init_7b": lambda: _sft("policy_init_7b"), "rm:vicuna13b": _rm_vicuna13b}


def _layout(preset, mesh_name):
    config, init, trainable, frozen = PRESETS[preset]()
    mesh = make_mesh(MESHES[mesh_name], jax.devices()[:8])
    # plan_state runs the start-up check with the preset's own limit: it raises when over.
    layout = plan_state(init, optax.adam(1e-4), mesh, make_rules(config.rules), trainable, frozen,
                        config.max_replicated_share)
    return config, layout


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_real_presets_leave_under_two_percent_replicated(preset, mesh_name):
    config, layout = _layout(preset, mesh_name)
    assert config.max_replicated_share == 0.02
    abstract = merge_trees(layout.abstract_state.params, layout.abstract_frozen)
    shardings = merge_trees(layout.state_shardings.params, layout.frozen_shardings)
    share, offenders = replicated_share(abstract, shardings)
    assert share < 0.001, offenders[:5]  # only norms and biases are left whole
    sizes, specs = _flat(abstract), _flat(shardings)
    for path, _ in offenders:
        assert "norm" in path or "layrnorm" in path or path.endswith("['bias']"), path
    # Every leaf of a MiB or more is split over fsdp at least (8 or 4 pieces).
    fsdp = MESHES[mesh_name]["fsdp"]
    for path, leaf in sizes.items():
        if leaf.size * leaf.dtype.itemsize >= 2**20:
            pieces = leaf.size // math.prod(specs[path].shard_shape(leaf.shape))
            assert pieces >= fsdp, (path, leaf.shape, specs[path].spec)
    # The optimizer's moments are laid out like the trainable params they belong to.
    train_specs = _flat(layout.state_shardings.params)
    mu = _flat(layout.state_shardings.opt_state[0].mu)
    assert mu.keys() == train_specs.keys()
    assert all(mu[k].spec == train_specs[k].spec for k in mu)


# Scanned layers: dimension 0 is 'layers' (never sharded).
LLM_SPECS_FSDP4_TENSOR2 = {
    "params/llm/embed_tokens": P("tensor", "fsdp"),  # [vocab, embed]
    "params/llm/lm_head/kernel": P("fsdp", "tensor"),  # [embed, vocab]
    "params/llm/layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor"),
    "params/llm/layers/self_attn/k_proj/kernel": P(None, "fsdp", "tensor"),
    "params/llm/layers/self_attn/o_proj/kernel": P(None, "tensor", "fsdp"),
    "params/llm/layers/mlp/gate_proj/kernel": P(None, "fsdp", "tensor"),
    "params/llm/layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
    "params/llm/layers/input_layernorm/scale": P(None, None),
    # Adapters: the rank takes 'fsdp' where the other dimension did not.
    "lora/llm/layers/self_attn/q_proj/lora_a": P(None, "fsdp", None),
    "lora/llm/layers/self_attn/q_proj/lora_b": P(None, "fsdp", "tensor"),
    "lora/llm/layers/self_attn/o_proj/lora_a": P(None, "tensor", "fsdp"),
    "lora/llm/layers/self_attn/o_proj/lora_b": P(None, None, "fsdp"),
    "lora/llm/layers/mlp/up_proj/lora_b": P(None, "fsdp", "tensor"),
    "lora/llm/layers/mlp/down_proj/lora_a": P(None, "tensor", "fsdp"),
    "lora/llm/layers/mlp/down_proj/lora_b": P(None, None, "fsdp"),
    # CLIP-L/336 and the projector.
    "params/vision/layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor"),
    "params/vision/layers/mlp/fc2/kernel": P(None, "tensor", "fsdp"),
    "params/vision/patch_embedding": P(None, None, None, "fsdp"),
    "params/vision/position_embedding": P(None, "fsdp"),
    "params/projector/linear_0/kernel": P(None, "fsdp"),
    "params/projector/linear_1/kernel": P("tensor", "fsdp"),
}


def _normalised(spec):
    """PartitionSpec with trailing Nones dropped (the fitted specs keep one entry a dim)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


@pytest.mark.parametrize("model", ["policy", "critic"])
def test_ppo_big_matrices_follow_the_rules(model):
    _, layout = _layout("ppo:vicuna7b", "fsdp4_tensor2")
    specs = _flat(merge_trees(layout.state_shardings.params, layout.frozen_shardings))
    adapters = {"policy": ("policy", "reference"), "critic": ("rm", "value")}[model]
    checked = 0
    for suffix, want in LLM_SPECS_FSDP4_TENSOR2.items():
        collection = suffix.split("/")[0]
        owners = adapters if collection == "lora" else (model,)
        for owner in owners:
            got = specs[f"{owner}/{suffix}"].spec
            assert _normalised(got) == _normalised(want), (owner, suffix, got)
            checked += 1
    assert checked == len(LLM_SPECS_FSDP4_TENSOR2) + sum(
        k.startswith("lora/") for k in LLM_SPECS_FSDP4_TENSOR2)
    # The heads [embed, 1]: the hidden side over fsdp.
    for head in ("rm", "value"):
        assert _normalised(specs[f"{head}/head/score/kernel"].spec) == ("fsdp",)


def test_fsdp_only_mesh_shards_every_adapter_over_fsdp():
    """The 2.5% that stayed whole before the rank axis had a rule: on an fsdp-only mesh, every
    adapter matrix of the four models is split 8 ways."""
    _, layout = _layout("ppo:vicuna7b", "fsdp8")
    specs = _flat(merge_trees(layout.state_shardings.params, layout.frozen_shardings))
    adapters = {k: v for k, v in specs.items() if "/lora/" in k or k.startswith("lora/")}
    assert len(adapters) == 4 * 7 * 2  # policy, reference, rm, value x 7 projections x (A, B)
    for path, sharding in adapters.items():
        assert "fsdp" in sharding.spec, (path, sharding.spec)
