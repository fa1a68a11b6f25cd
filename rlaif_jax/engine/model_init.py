"""The model a stage trains and the variables it starts from (shared by every stage).

`config.init` names the start: '' (random), an HF directory, an earlier stage's directory (its
latest checkpoint), a step directory, or `stage:NAME` (WORKDIR/NAME of this run's workdir).
Starting from an earlier stage's checkpoint lays its trainable variables over the base that
stage started from (recursively, down to random or HF weights). When that checkpoint holds a
LoRA adapter and this stage trains its own (`init_adapter='merge'`, the default), the earlier
adapter is folded into the base (`merge_lora`) and this stage's adapter starts fresh (A random,
B zero): the model starts out computing exactly what the earlier stage's model computed, and
the two adapters may have different ranks (docs/method.md: SFT r 32 -> policy init r 64).
`init_adapter='continue'` keeps training the earlier adapter instead (same rank and targets).
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax.checkpoints import hf
from rlaif_jax.checkpoints.orbax_io import read_step_dir, resolve_checkpoint
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.models.config_base import RUNTIME_FIELDS, plain_dict
from rlaif_jax.data import conversation
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.models.lora import LoraConfig, merge_lora
from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.engine import optim
from rlaif_jax.engine.state import StateLayout, place
from rlaif_jax.parallel.sharding import mesh_context
from rlaif_jax.workdir.layout import PPO_STAGE, resolve_init

INIT_ADAPTER = ("merge", "continue")


def lora_of(model) -> LoraConfig:
    config = model.config
    return config.llm.lora if hasattr(config, "llm") else config.lora


def _init_fn(model):
    # Text-only init still creates a video LLM's vision tower and projector params.
    return lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))


def _config_error(e: Exception) -> ConfigError:
    return ConfigError(f"model: {str(e).splitlines()[0]}")


def _llama_overrides(overrides: dict) -> dict:
    if "reward_head" in overrides:
        raise ConfigError("a reward model needs model_kind='video_llm' (the reward head lives "
                          "in the video LLM)")
    lora = overrides.get("lora")
    if isinstance(lora, dict) or hasattr(lora, "to_dict"):
        overrides = dict(overrides, lora=LoraConfig(**plain_dict(lora)))
    return overrides


def video_llm_config(model_config, tokenizer=None, **overrides):
    """A VideoLLMConfig from a video preset of configs/models.py (or the `model` a stage saved);
    with a tokenizer, the LLM's vocabulary and special ids and the `<image>` id are the
    tokenizer's. `overrides` as for `model_from_config`."""
    values = plain_dict(model_config)
    llm, vision = plain_dict(values.get("llm", {})), plain_dict(values.get("vision", {}))
    if tokenizer is not None:
        llm.update(vocab_size=conversation.vocabulary_size(tokenizer),
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        values["image_token_id"] = conversation.image_token_id(tokenizer)
    top, llm_overrides, vision_overrides = hf.split_video_llm_overrides(overrides)
    llm.update(llm_overrides)
    vision.update(vision_overrides)
    values.update(top, llm=llm, vision=vision)
    try:
        return VideoLLMConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise _config_error(e) from None


def model_from_config(model_kind: str, model_config, tokenizer=None, **overrides):
    """(model, init_variables(rng) -> boxed variables) of a 'llama' or 'video_llm' model config.

    `tokenizer` sets a video LLM's vocabulary and ids (`video_llm_config`). `overrides` set
    model config fields on top, as `rlaif_jax.from_pretrained`'s do: e.g. reward_head=True,
    lora={'rank', 'alpha', 'targets'}, dtype='bfloat16'; a video LLM's LLaMA and CLIP fields go
    to the configs that have them (`llm=` / `vision=` dicts to one).
    """
    if model_kind == "llama":
        try:
            config = LlamaConfig.from_dict(dict(plain_dict(model_config),
                                                **_llama_overrides(overrides)))
        except (TypeError, ValueError) as e:
            raise _config_error(e) from None
        model = Llama(config)
    elif model_kind == "video_llm":
        model = VideoLLM(video_llm_config(model_config, tokenizer, **overrides))
    else:
        raise ConfigError(f"model_kind={model_kind!r}: expected 'llama' or 'video_llm'")
    return model, _init_fn(model)


def build_model(config, tokenizer=None, **overrides):
    """(model, init_variables(rng) -> boxed variables) of a stage's config: config.model_kind
    and config.model, except that a LLaMA started from a Hugging Face directory takes its
    architecture from that directory (and only how to run it, and the adapter to train, from
    config.model)."""
    init = resolve_init(config.workdir, config.init)
    if init and resolve_checkpoint(init)[0] == "hf":
        if config.model_kind == "video_llm":
            raise ConfigError("model_kind='video_llm' from a Hugging Face LLaVA directory is not "
                              "wired into the training stages yet (init from a stage directory)")
        if config.model_kind == "llama":
            with open(os.path.join(resolve_checkpoint(init)[1], "config.json")) as f:
                hf_config = json.load(f)
            preset = LlamaConfig.from_dict(config.model)
            runtime = {k: getattr(preset, k) for k in RUNTIME_FIELDS + ("lora",)}
            model = Llama(hf.llama_config_from_hf(
                hf_config, **dict(runtime, **_llama_overrides(overrides))))
            return model, _init_fn(model)
    return model_from_config(config.model_kind, config.model, tokenizer, **overrides)


def _sharding_of(layout: StateLayout, path: str):
    """The sharding of variable `path` ('params/layers/...') in the trainable or frozen tree."""
    for tree in (layout.state_shardings.params, layout.frozen_shardings):
        node = tree
        for part in path.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            return node
    raise KeyError(path)


def all_shardings(layout: StateLayout) -> dict:
    """The shardings of every variable of a layout, trainable and frozen, as one tree."""
    return optim.merge_trees(layout.state_shardings.params, layout.frozen_shardings)


def _random_variables(layout: StateLayout, init_variables, seed: int, collections=None):
    """Freshly initialised variables (only `collections`, e.g. ('lora',)), on their shards."""
    shardings = all_shardings(layout)
    keep = tuple(collections or shardings)
    with mesh_context(layout.mesh, layout.rules):
        fn = jax.jit(lambda rng: {k: v for k, v in nn.unbox(init_variables(rng)).items()
                                  if k in keep},
                     out_shardings={k: shardings[k] for k in keep})
        return fn(jax.random.PRNGKey(seed))


def _paths_regex(tree) -> str:
    paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return "|".join(re.escape(p) for p in paths) or "(?!)"


def overlay(base: dict, top: dict) -> dict:
    """`base` with every leaf that `top` has replaced by `top`'s."""
    return optim.merge_trees(optim.split_trainable(base, _paths_regex(top))[1], dict(top))


def read_checkpoint(step_dir: str) -> tuple[dict, dict]:
    """(saved variables, meta) of a step directory, as a later stage starts from it.

    A PPO checkpoint (stage 'ppo': the policy's trained adapter and the value model) reads as
    the policy-init checkpoint PPO started from, with PPO's adapter in place of its own: the
    policy's model, built and laid over its base as that stage did.
    """
    saved, meta = read_step_dir(step_dir)
    if meta.get("stage") != PPO_STAGE:
        return saved, meta
    policy = dict(saved.get("policy") or {})
    if set(policy) != {"lora"}:
        raise CheckpointError(f"{step_dir}: a PPO checkpoint whose policy holds {sorted(policy)}; "
                              "only a trained LoRA adapter ('lora') can be read back")
    start, start_meta = read_checkpoint(resolve_checkpoint(meta["init"])[1])
    return overlay(start, policy), start_meta


def _lora_from_meta(meta: dict) -> Optional[LoraConfig]:
    """The LoRA settings of the model a checkpoint was trained with."""
    lora = meta.get("lora")
    if lora is None:  # checkpoints that predate the 'lora' entry: read the stage's config
        model = meta.get("config", {}).get("model", {})
        lora = model.get("llm", model).get("lora")
    return LoraConfig(**lora) if lora and int(lora.get("rank", 0)) > 0 else None


def starting_variables(init: str, layout: StateLayout, init_variables, seed: int,
                       init_adapter: str = "merge") -> dict:
    """The variables a run starts from (see the module docstring)."""
    if init_adapter not in INIT_ADAPTER:
        raise ConfigError(f"init_adapter={init_adapter!r}: expected one of {INIT_ADAPTER}")
    if not init:
        return _random_variables(layout, init_variables, seed)
    kind, path = resolve_checkpoint(init)
    abstract = optim.merge_trees(layout.abstract_state.params, layout.abstract_frozen)
    if kind == "hf":
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
        num_layers = hf_config["num_hidden_layers"]
        llama_config = hf.llama_config_from_hf(hf_config)
        params = hf.load_params(
            hf.SafetensorsReader(path), hf.llama_rules(llama_config), abstract["params"],
            num_layers, place=lambda p, a: place(a, _sharding_of(layout, "params/" + p)))
        variables = {"params": params}
        extra = tuple(k for k in abstract if k != "params")
        if extra:
            variables.update(_random_variables(layout, init_variables, seed, extra))
        return variables
    saved, meta = read_checkpoint(path)
    base = starting_variables(meta.get("init", ""), layout, init_variables,
                              int(meta.get("seed", seed)), init_adapter)
    saved = dict(saved)
    adapter = saved.pop("lora", None) if init_adapter == "merge" else None
    variables = overlay(base, saved)
    if adapter is not None:
        earlier = _lora_from_meta(meta)
        if earlier is None:
            raise ConfigError(f"{path}: the checkpoint holds a LoRA adapter but its meta does not "
                              "say with which rank and alpha it was trained")
        shardings = all_shardings(layout)["params"]
        merge = jax.jit(lambda p, a: merge_lora(p, a, earlier), out_shardings=shardings)
        with mesh_context(layout.mesh, layout.rules):
            variables["params"] = merge(variables["params"], adapter)
    return variables
