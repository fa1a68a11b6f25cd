"""A stage's model from its orbax checkpoint: the architecture from the config the stage ran
with (saved in the checkpoint's meta), the variables from the checkpoint laid over the base it
was trained from (engine/model_init.py `starting_variables`).

The public door is `rlaif_jax.from_pretrained`, which sends stage directories (WORKDIR/sft,
policy_init, rm, ppo, ...), their checkpoints/ directories and step directories here; later
stages (reward model, PPO) read the configs of the stages they start from with `stage_config`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from rlaif_jax.checkpoints.orbax_io import META_ITEM, resolve_checkpoint
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.engine.model_init import PPO_STAGE, build_model


def read_meta(step_dir: str) -> dict:
    """The JSON meta of a step directory (stage, init, seed, config)."""
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.join(step_dir, META_ITEM)))


def _model_meta(step_dir: str) -> dict:
    """The meta of the checkpoint whose stage built the model: a PPO checkpoint's model is its
    policy init's (PPO trains that model's adapter)."""
    meta = read_meta(step_dir)
    if meta.get("stage") == PPO_STAGE:
        return _model_meta(resolve_checkpoint(meta["init"])[1])
    return meta


def stage_config(init: str) -> tuple[str, dict]:
    """(step directory of `init`, the config of the stage that built its model), with the
    config's `init` replaced by the resolved one the checkpoint recorded."""
    kind, path = resolve_checkpoint(init)
    if kind != "step":
        raise CheckpointError(f"{init}: expected a stage or step directory, found a Hugging Face "
                              "directory")
    meta = _model_meta(path)
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
    # WORKDIR/<stage>/checkpoints/<step>, wherever the workdir has moved since.
    for workdir in (os.path.dirname(os.path.dirname(os.path.dirname(step_dir))),
                    config.get("workdir")):
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
    import jax
    import optax

    from rlaif_jax.parallel.mesh import make_mesh
    from rlaif_jax.parallel.sharding import DEFAULT_RULES
    from rlaif_jax.engine.model_init import all_shardings, starting_variables
    from rlaif_jax.engine.state import plan_state

    step_dir, config = stage_config(init)
    if tokenizer is None and config.get("model_kind") == "video_llm":
        import transformers
        tokenizer = transformers.AutoTokenizer.from_pretrained(stage_tokenizer_dir(step_dir))
    model, init_variables = build_stage_model(config, tokenizer, **overrides)
    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    rules = DEFAULT_RULES if rules is None else rules
    layout = plan_state(init_variables, optax.identity(), mesh, rules, ".*", "", 1.0)
    variables = starting_variables(step_dir, layout, init_variables, int(config.get("seed", 0)))
    # What came from the checkpoint is still on the host: onto the mesh with the rest.
    return model, jax.device_put(variables["params"], all_shardings(layout)["params"])
