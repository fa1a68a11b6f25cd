"""PPO's starting tree from the earlier stages' checkpoints (SPEC.md stage 5).

- policy = the policy-init checkpoint: its frozen base (the SFT model, itself rebuilt from its
  own checkpoint chain) and its LoRA adapter, which PPO keeps training;
- reference = the same base with the same initial adapter (a second adapter on the one base,
  never a second copy of the base);
- RM = the reward-model checkpoint: its backbone, its adapter when it has one, its reward head;
- value = the RM's backbone with its own trainable copy of the RM adapter (an RM trained without
  adapter, i.e. fully fine-tuned, gets a fresh adapter whose B is zero: it starts as exactly the
  RM backbone) and a zero-initialised value head.

The policy and the RM may share one frozen base only when the RM is an adapter over it; a fully
fine-tuned RM (the tiny preset's) is a backbone of its own (`critic` in the tree).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import optax

from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.checkpoints.stage_model import build_stage_model, stage_config
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.train.model_init import overlay, read_checkpoint, starting_variables
from rlaif_jax.train.ppo_models import ActorCritic
from rlaif_jax.train.state import plan_state

STAGE_PREFIX = "stage:"


def stage_path(workdir: str, init: str) -> str:
    """`stage:NAME` -> WORKDIR/NAME; anything else as given."""
    if init.startswith(STAGE_PREFIX):
        return os.path.join(os.path.abspath(workdir), init[len(STAGE_PREFIX):])
    return os.path.expanduser(init)


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


def load_keeping_adapter(step_dir: str, model_init, mesh, rules, seed: int) -> dict:
    """The variables of a checkpoint WITH its own LoRA adapter kept as an adapter (the base
    under it rebuilt as that stage built it: earlier adapters merged)."""
    layout = plan_state(model_init, optax.identity(), mesh, rules, ".*", "", 1.0)
    saved, meta = read_checkpoint(step_dir)
    base = starting_variables(meta.get("init", ""), layout, model_init,
                              int(meta.get("seed", seed)), "merge")
    return overlay(base, saved)


def load_actor_critic(workdir: str, init: str, rm_init: str, mesh, rules, tokenizer,
                      value_lora: dict, critic_shares_base: bool = True, seed: int = 0,
                      score_fn_only: bool = False) -> LoadedModels:
    """The ActorCritic of a PPO run and a loader of its starting tree. `value_lora` (rank,
    alpha, targets) is the value adapter's when the RM has none. `score_fn_only`: the reward
    comes from a host scorer (the true-reward control), yet the value model is still the RM's
    backbone, as in the RLAIF run, so that the two runs differ only in the reward."""
    policy_dir = stage_path(workdir, init)
    rm_dir = stage_path(workdir, rm_init)
    try:
        policy_step, policy_config = stage_config(policy_dir)
        rm_step, rm_config = stage_config(rm_dir)
    except (CheckpointError, FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"ppo: cannot read the policy-init or reward-model checkpoint: "
                          f"{str(e).splitlines()[0]}") from None
    policy, policy_init = build_stage_model(policy_config, tokenizer)
    if int(_lora_dict(policy_config["model"]).get("rank", 0)) <= 0:
        raise ConfigError(f"ppo: the policy-init checkpoint {policy_step} has no LoRA adapter "
                          "(PPO trains the policy's adapter; the reference is the base with the "
                          "initial adapter)")
    rm_model = dict(rm_config["model"])
    rm_lora = dict(rm_config.get("lora") or _lora_dict(rm_model))
    rm_has_adapter = int(rm_lora.get("rank", 0)) > 0
    critic_lora = rm_lora if rm_has_adapter else dict(value_lora)
    shares = bool(critic_shares_base and rm_has_adapter)
    # The RM as trained (reward head in its params) for loading; the critic module without it
    # (the tree keeps the head under 'rm').
    rm_full, rm_full_init = build_stage_model(rm_config, tokenizer, reward_head=True,
                                              lora=critic_lora)
    critic, _ = build_stage_model(rm_config, tokenizer, reward_head=False, lora=critic_lora)
    if shares:
        critic = policy
    models = ActorCritic(policy=policy, critic=critic, critic_shares_base=shares,
                         rm_has_adapter=rm_has_adapter)

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
        tree = {"policy": {"params": p["params"], "lora": p["lora"]},
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
        tree["policy"]["lora"] = jax.tree.map(_copy, p["lora"])
        return tree

    return LoadedModels(models, policy_step, rm_step, policy_config, rm_config, variables)


def _copy(x: Any) -> Any:
    return x.copy() if hasattr(x, "copy") else np.array(x)
