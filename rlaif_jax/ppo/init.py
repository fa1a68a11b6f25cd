"""PPO's starting tree from the earlier stages' checkpoints (docs/method.md stage 5).

- policy = the policy-init checkpoint: its frozen base (the SFT model, itself rebuilt from its
  own checkpoint chain) and its LoRA adapter, which PPO keeps training;
- reference = the same base with the same initial adapter (a second adapter on the one base,
  never a second copy of the base);
- RM = the reward-model checkpoint: its backbone, its adapter when it has one, its reward head;
- value = the RM's backbone with its own trainable copy of the RM adapter (an RM trained without
  adapter, i.e. fully fine-tuned, gets a fresh adapter whose B is zero: it starts as exactly the
  RM backbone) and a zero-initialised value head.

The policy and the RM share one frozen base only when the RM is an adapter trained on exactly
the policy's base (both stages started from the same checkpoint, the policy init merged its
adapter, the RM trained only its adapter and head); otherwise, e.g. a fully fine-tuned RM (the
tiny preset's) or docs/method.md's 13B RM under a 7B policy, the RM's backbone is a tree of its own
(`critic`). Each checkpoint's base is rebuilt as its stage built it (`load_keeping_adapter`).
With `full_finetune` the policy-init adapter is folded into the policy's base, which PPO trains.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import optax

from rlaif_jax.checkpoints.orbax_io import resolve_checkpoint
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.checkpoints.orbax_io import read_meta
from rlaif_jax.engine.pretrained import build_stage_model, stage_config
from rlaif_jax.models.config_base import RUNTIME_FIELDS
from rlaif_jax.models.lora import lora_config_of, merge_lora
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.engine import optim
from rlaif_jax.engine.model_init import overlay, read_checkpoint, starting_variables
from rlaif_jax.ppo.actor_critic import ActorCritic
from rlaif_jax.engine.state import plan_state
from rlaif_jax.workdir.layout import resolve_init

@dataclasses.dataclass
class LoadedModels:
    models: ActorCritic
    policy_step: str  # the checkpoints the tree was made from
    rm_step: str
    policy_config: dict  # the configs those stages ran with
    rm_config: dict
    variables: Any  # () -> the tree, loaded on first use (the main job's runs share it)


def _lora_dict(model_config: dict) -> dict:
    llm = model_config.get("llm", model_config)
    return dict(llm.get("lora") or {})


def with_runtime(model: dict, runtime: Any) -> dict:
    """A checkpoint's model config with the runtime fields of `runtime` (a model config of the
    PPO config, video or text; empty: unchanged) laid over it, part by part (llm, vision)."""
    runtime = runtime.to_dict() if hasattr(runtime, "to_dict") else dict(runtime or {})

    def lay(target: dict, source: dict) -> dict:
        return dict(target, **{k: source[k] for k in RUNTIME_FIELDS if k in source})

    out = dict(model)
    runtime_llm = runtime.get("llm", runtime)  # a text LLaMA config is the llm itself
    if "llm" in out:
        out["llm"] = lay(dict(out["llm"]), runtime_llm)
        if "vision" in out and "vision" in runtime:
            out["vision"] = lay(dict(out["vision"]), runtime["vision"])
        return out
    return lay(out, runtime_llm)


def _init_adapter(meta: dict) -> str:
    """How the stage treated its init's adapter ('merge' unless its config said 'continue')."""
    return str(meta.get("config", {}).get("init_adapter", "merge"))


def load_keeping_adapter(step_dir: str, model_init, mesh, rules, seed: int) -> dict:
    """The variables of a checkpoint WITH its own LoRA adapter kept as an adapter (the base
    under it rebuilt as that stage built it: earlier adapters merged, or, for a stage that
    continued its init's adapter, left out, since the checkpoint's adapter replaces it)."""
    layout = plan_state(model_init, optax.identity(), mesh, rules, ".*", "", 1.0)
    saved, meta = read_checkpoint(step_dir)
    base = starting_variables(meta.get("init", ""), layout, model_init,
                              int(meta.get("seed", seed)), _init_adapter(meta))
    return overlay(base, saved)


def _base_step(step_dir: str) -> str:
    """The checkpoint a stage's checkpoint was started from ('' for a random start)."""
    init = read_meta(step_dir).get("init", "")
    if not init:
        return ""
    try:
        return os.path.realpath(resolve_checkpoint(init)[1])
    except (CheckpointError, FileNotFoundError, OSError):
        return ""


def rm_backbone_is_policy_base(policy_step: str, policy_config: dict, rm_step: str,
                               rm_config: dict, rm_abstract) -> tuple[bool, str]:
    """(whether the RM adapter sits on exactly the policy's frozen base, why not). True when
    both stages started from the same checkpoint, the policy init merged its adapter (so its
    base is that checkpoint's model, as the RM's is) and the RM trained nothing of the
    backbone itself (only its adapter and head)."""
    policy_base, rm_base = _base_step(policy_step), _base_step(rm_step)
    if not policy_base or policy_base != rm_base:
        return False, (f"the RM was trained from {rm_base or 'a random start'}, the policy init "
                       f"from {policy_base or 'a random start'}")
    if _init_adapter({"config": policy_config}) != "merge":
        return False, "the policy init continued its init's adapter instead of merging it"
    trained = optim.split_trainable(rm_abstract, str(rm_config.get("trainable", ".*")),
                                    str(rm_config.get("frozen", "")))[0]
    backbone = {k: v for k, v in trained.get("params", {}).items() if k != "reward_head"}
    if backbone:
        return False, f"the RM trained its backbone's {sorted(backbone)}"
    return True, ""


def load_actor_critic(workdir: str, init: str, rm_init: str, mesh, rules, tokenizer,
                      value_lora: dict, critic_shares_base: bool = True, seed: int = 0,
                      full_finetune: bool = False, policy_runtime: Any = None,
                      critic_runtime: Any = None) -> LoadedModels:
    """The ActorCritic of a PPO run and a loader of its starting tree. The architectures come
    from the checkpoints; `policy_runtime` / `critic_runtime` (the PPO config's `model` and
    `critic_model`) set how to run them (RUNTIME_FIELDS: dtype, remat...). `value_lora` (rank,
    alpha, targets) is the value adapter's when the RM has none. `full_finetune`: the policy
    is its base with the policy-init adapter folded in, all trained (vision and projector
    frozen); the reference is a frozen copy of it. The true-reward control loads the same
    tree: its value model is still the RM's backbone, so the two runs differ only in reward."""
    policy_dir = resolve_init(workdir, init)
    rm_dir = resolve_init(workdir, rm_init)
    try:
        policy_step, policy_config = stage_config(policy_dir)
        rm_step, rm_config = stage_config(rm_dir)
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"ppo: cannot read the policy-init or reward-model checkpoint: "
                          f"{str(e).splitlines()[0]}") from None
    policy, policy_init = build_stage_model(
        dict(policy_config, model=with_runtime(policy_config["model"], policy_runtime)),
        tokenizer)
    if int(_lora_dict(policy_config["model"]).get("rank", 0)) <= 0:
        raise ConfigError(f"ppo: the policy-init checkpoint {policy_step} has no LoRA adapter "
                          "(PPO trains the policy's adapter; the reference is the base with the "
                          "initial adapter)")
    rm_model = with_runtime(dict(rm_config["model"]), critic_runtime)
    rm_runtime_config = dict(rm_config, model=rm_model)
    rm_lora = dict(rm_config.get("lora") or _lora_dict(rm_model))
    rm_has_adapter = int(rm_lora.get("rank", 0)) > 0
    critic_lora = rm_lora if rm_has_adapter else dict(value_lora)
    # The RM as trained (reward head in its params) for loading; the critic module without it
    # (the tree keeps the head under 'rm').
    rm_full, rm_full_init = build_stage_model(rm_runtime_config, tokenizer, reward_head=True,
                                              lora=critic_lora)
    # One frozen base for all four models only where the RM adapter was trained on exactly the
    # policy's base; a fully fine-tuned RM, or one over another base, keeps its own backbone.
    shares = bool(critic_shares_base and rm_has_adapter and not full_finetune)
    if shares:
        shares, why = rm_backbone_is_policy_base(
            policy_step, policy_config, rm_step, rm_config,
            jax.eval_shape(rm_full_init, jax.ShapeDtypeStruct((2,), np.uint32)))
        if not shares and jax.process_index() == 0:
            print(f"[ppo] the critic gets its own copy of the RM's backbone: {why}", flush=True)
    critic, _ = build_stage_model(rm_runtime_config, tokenizer, reward_head=False,
                                  lora=critic_lora)
    if shares:
        critic = policy
    models = ActorCritic(policy=policy, critic=critic, critic_shares_base=shares,
                         full_finetune=full_finetune, rm_has_adapter=rm_has_adapter,
                         rm_likelihood_weight=float(rm_config.get("likelihood_weight", 0.0)))

    loaded: dict = {}

    def variables() -> dict:
        # Loaded once; every call returns fresh copies of what PPO trains (the train step
        # donates those buffers), while the frozen leaves are shared.
        if not loaded:
            loaded["p"] = load_keeping_adapter(policy_step, policy_init, mesh, rules, seed)
            loaded["c"] = load_keeping_adapter(rm_step, rm_full_init, mesh, rules, seed)
        p, c = loaded["p"], loaded["c"]
        c_params = dict(c["params"])
        head = c_params.pop("reward_head", None)
        if head is None:
            raise ConfigError(f"ppo: the reward-model checkpoint {rm_step} has no reward head")
        if full_finetune:
            merged = merge_lora(p["params"], p["lora"], lora_config_of(policy))
            # The trained copy must not alias the frozen reference (the step donates it).
            tree = {"policy": {"params": jax.tree.map(_copy, merged)},
                    "reference": {"params": merged}}
        else:
            tree = {"policy": {"params": p["params"], "lora": jax.tree.map(_copy, p["lora"])},
                    "reference": {"lora": p["lora"]}}
        if not shares:
            tree["critic"] = {"params": c_params}
        tree["rm"] = {"head": head}
        if rm_has_adapter:
            tree["rm"]["lora"] = c["lora"]
        # The value model's own copies (trainable leaves get donated by the train step, so they
        # must not alias the frozen reference / RM adapters).
        tree["value"] = {"lora": jax.tree.map(_copy, c["lora"]),
                         "head": jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                              head)}
        return tree

    return LoadedModels(models, policy_step, rm_step, policy_config, rm_config, variables)


def _copy(x: Any) -> Any:
    return x.copy() if hasattr(x, "copy") else np.array(x)
