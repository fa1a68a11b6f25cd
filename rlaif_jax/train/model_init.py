"""The model a stage trains and the variables it starts from (shared by every stage).

`config.init` names the start: '' (random), an HF directory, an earlier stage's directory (its
latest checkpoint), a step directory, or `stage:NAME` (WORKDIR/NAME of this run's workdir).
Starting from an earlier stage's checkpoint lays its trainable variables over the base that
stage started from (recursively, down to random or HF weights). When that checkpoint holds a
LoRA adapter and this stage trains its own (`init_adapter='merge'`, the default), the earlier
adapter is folded into the base (`merge_lora`) and this stage's adapter starts fresh (A random,
B zero): the model starts out computing exactly what the earlier stage's model computed, and
the two adapters may have different ranks (SPEC.md: SFT r 32 -> policy init r 64).
`init_adapter='continue'` keeps training the earlier adapter instead (same rank and targets).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax.checkpoints import hf
from rlaif_jax.checkpoints.orbax_io import read_step_dir, resolve_checkpoint
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.models.lora import LoraConfig, merge_lora
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.train import optim
from rlaif_jax.train.state import StateLayout, mesh_context, place

# Model fields that describe how to run, not what the weights are: a config may set them on top
# of a checkpoint's own config.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "lora")
STAGE_PREFIX = "stage:"
INIT_ADAPTER = ("merge", "continue")


def resolve_init(config) -> str:
    """config.init with `stage:NAME` resolved against the workdir ('' stays '')."""
    init = config.init
    if init.startswith(STAGE_PREFIX):
        return os.path.join(os.path.abspath(config.workdir), init[len(STAGE_PREFIX):])
    return init


def lora_of(model) -> LoraConfig:
    config = model.config
    return config.llm.lora if hasattr(config, "llm") else config.lora


def video_llm_config(model_config, tokenizer=None):
    """A VideoLLMConfig from the config's `model` (a video preset of configs/models.py); with a
    tokenizer, the LLM's vocabulary and special ids and the `<image>` id are the tokenizer's."""
    from rlaif_jax.models.video_llm import VideoLLMConfig

    values = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if tokenizer is not None:
        from rlaif_jax.data import conversation
        llm = dict(values["llm"])
        llm.update(vocab_size=conversation.vocabulary_size(tokenizer),
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        values["llm"] = llm
        values["image_token_id"] = conversation.image_token_id(tokenizer)
    try:
        return VideoLLMConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def build_model(config, tokenizer=None):
    """(model, init_variables(rng) -> boxed variables) for config.model_kind."""
    init = resolve_init(config) if config.init else ""
    if config.model_kind == "llama":
        model_config = LlamaConfig.from_dict(config.model)
        if init and resolve_checkpoint(init)[0] == "hf":
            with open(os.path.join(resolve_checkpoint(init)[1], "config.json")) as f:
                hf_config = json.load(f)
            runtime = {k: getattr(model_config, k) for k in RUNTIME_FIELDS}
            model_config = hf.llama_config_from_hf(hf_config, **runtime)
        model = Llama(model_config)
        return model, lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))
    if config.model_kind == "video_llm":
        from rlaif_jax.models.video_llm import VideoLLM
        if init and resolve_checkpoint(init)[0] == "hf":
            raise ConfigError("model_kind='video_llm' from a Hugging Face LLaVA directory is not "
                              "wired into the training stages yet (init from a stage directory)")
        model = VideoLLM(video_llm_config(config.model, tokenizer))
        # Text-only init still creates the vision tower's and projector's params.
        return model, lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))
    raise ConfigError(f"model_kind={config.model_kind!r}: expected 'llama' or 'video_llm'")


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


def _all_shardings(layout: StateLayout) -> dict:
    return optim.merge_trees(layout.state_shardings.params, layout.frozen_shardings)


def _random_variables(layout: StateLayout, init_variables, seed: int, collections=None):
    """Freshly initialised variables (only `collections`, e.g. ('lora',)), on their shards."""
    shardings = _all_shardings(layout)
    keep = tuple(collections or shardings)
    with mesh_context(layout.mesh, layout.rules):
        fn = jax.jit(lambda rng: {k: v for k, v in nn.unbox(init_variables(rng)).items()
                                  if k in keep},
                     out_shardings={k: shardings[k] for k in keep})
        return fn(jax.random.PRNGKey(seed))


def _paths_regex(tree) -> str:
    paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return "|".join(re.escape(p) for p in paths) or "(?!)"


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
    saved, meta = read_step_dir(path)
    base = starting_variables(meta.get("init", ""), layout, init_variables,
                              int(meta.get("seed", seed)), init_adapter)
    saved = dict(saved)
    adapter = saved.pop("lora", None) if init_adapter == "merge" else None
    rest = optim.split_trainable(base, _paths_regex(saved))[1]  # drops what `saved` replaces
    variables = optim.merge_trees(rest, saved)
    if adapter is not None:
        earlier = _lora_from_meta(meta)
        if earlier is None:
            raise ConfigError(f"{path}: the checkpoint holds a LoRA adapter but its meta does not "
                              "say with which rank and alpha it was trained")
        shardings = _all_shardings(layout)["params"]
        merge = jax.jit(lambda p, a: merge_lora(p, a, earlier), out_shardings=shardings)
        with mesh_context(layout.mesh, layout.rules):
            variables["params"] = merge(variables["params"], adapter)
    return variables
