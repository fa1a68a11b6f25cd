"""Loading a trained model for inference: a Hugging Face directory, or a stage's orbax
checkpoint (the architecture from the config the stage ran with, saved in the checkpoint's meta;
the variables laid over the base it was trained from, engine/model_init.py `starting_variables`).

`rlaif_jax.from_pretrained` is the public door to `load_model`; the feedback, inference and eval
stages call it directly. Later stages (reward model, PPO) read the configs of the stages they
start from with `stage_config`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlaif_jax.checkpoints import hf
from rlaif_jax.checkpoints.orbax_io import resolve_checkpoint
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.engine.model_init import all_shardings, build_model, starting_variables
from rlaif_jax.engine.state import plan_state
from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.parallel.sharding import DEFAULT_RULES, shard_params
from rlaif_jax.workdir.layout import model_meta, workdir_of

HF_MODEL_TYPES = {"llama": hf.load_llama, "clip_vision_model": hf.load_clip_vision,
                  "clip": hf.load_clip_vision, "llava": hf.load_video_llm}


def stage_config(init: str) -> tuple[str, dict]:
    """(step directory of `init`, the config of the stage that built its model), with the
    config's `init` replaced by the resolved one the checkpoint recorded."""
    kind, path = resolve_checkpoint(init)
    if kind != "step":
        raise CheckpointError(f"{init}: expected a stage or step directory, found a Hugging Face "
                              "directory")
    meta = model_meta(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: its meta holds no config; cannot rebuild the model")
    return path, dict(meta["config"], init=meta.get("init", ""))


def build_stage_model(config: dict, tokenizer=None, **overrides) -> tuple[Any, Any]:
    """(model, init_variables(rng)) of a `stage_config` config, built as its stage built it;
    `overrides` as for `rlaif_jax.from_pretrained` (e.g. reward_head=True, lora={...})."""
    values = dict(config, model_kind=config.get("model_kind", "llama"))
    return build_model(ml_collections.ConfigDict(values), tokenizer, **overrides)


def _tokenizer_candidates(step_dir: str, config: dict) -> list[str]:
    data = config.get("data") or {}
    named = [config.get("tokenizer"), data.get("tokenizer")]  # eval/feedback/rm; SFT 'build'
    worlds = [config.get("world_dir"), data.get("world")]
    for workdir in (workdir_of(step_dir), config.get("workdir")):
        if workdir:
            worlds.append(os.path.join(workdir, "data", "world"))
    return [p for p in named if p] + [os.path.join(w, "tokenizer") for w in worlds if w]


def stage_tokenizer_dir(init: str) -> str:
    """The tokenizer directory the stage of a stage or step directory ran with."""
    step_dir, config = stage_config(init)
    candidates = _tokenizer_candidates(step_dir, config)
    for candidate in candidates:
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise CheckpointError(f"{step_dir}: no tokenizer of its stage found (looked in "
                          f"{', '.join(candidates) or 'nothing its config names'}); pass one")


def load_stage(init: str, mesh=None, rules=None, tokenizer=None,
               **overrides) -> tuple[Any, dict]:
    """(model, params) of a stage or step directory; see `rlaif_jax.from_pretrained`."""
    step_dir, config = stage_config(init)
    if tokenizer is None and config.get("model_kind") == "video_llm":
        import transformers  # heavy: only a video stage's tokenizer needs it
        tokenizer = transformers.AutoTokenizer.from_pretrained(stage_tokenizer_dir(step_dir))
    model, init_variables = build_stage_model(config, tokenizer, **overrides)
    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    rules = DEFAULT_RULES if rules is None else rules
    layout = plan_state(init_variables, optax.identity(), mesh, rules, ".*", "", 1.0)
    variables = starting_variables(step_dir, layout, init_variables, int(config.get("seed", 0)))
    # What came from the checkpoint is still on the host: onto the mesh with the rest.
    return model, jax.device_put(variables["params"], all_shardings(layout)["params"])


def load_model(path: str, mesh=None, rules=None, tokenizer=None,
               **config_overrides) -> tuple[Any, dict]:
    """(model, params) of a Hugging Face directory or a stage, checkpoints/ or step directory;
    see `rlaif_jax.from_pretrained` for the arguments."""
    kind, resolved = resolve_checkpoint(path)
    if kind == "step":
        return load_stage(resolved, mesh, rules, tokenizer, **config_overrides)
    with open(os.path.join(resolved, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(
            f"{resolved}: config.json has model_type {model_type!r}; expected a Hugging Face "
            f"directory of {sorted(HF_MODEL_TYPES)} or a stage, checkpoints/ or step directory "
            "holding an orbax checkpoint")
    if mesh is None:
        return HF_MODEL_TYPES[model_type](resolved, **config_overrides)
    # Read to host memory, then straight onto the shards.
    model, params = HF_MODEL_TYPES[model_type](resolved, place=lambda _, array: array,
                                               **config_overrides)
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    return model, shard_params(params, boxed["params"], mesh,
                               DEFAULT_RULES if rules is None else rules)


def tokenizer_dir(path: str) -> str:
    """The tokenizer directory that goes with anything `load_model` loads: a Hugging Face
    directory is its own; a stage or step directory's is the one its stage ran with."""
    kind, resolved = resolve_checkpoint(path)
    if kind == "hf":
        return resolved
    return stage_tokenizer_dir(resolved)
