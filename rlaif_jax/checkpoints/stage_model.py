"""An earlier stage's model for a later stage: its architecture from the checkpoint's config,
its variables from the checkpoint laid over the base it was trained from.

`config.init` of the feedback and reward stages names the SFT stage (a stage directory, its
checkpoints/ directory or one step directory); a Hugging Face directory also works.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from rlaif_jax.checkpoints.orbax_io import META_ITEM, resolve_checkpoint
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.parallel.mesh import ConfigError


try:  # the SFT wiring (issue 5) moves the starting point into train/model_init.py
    from rlaif_jax.train.model_init import starting_variables
except ImportError:
    from rlaif_jax.train.sft import starting_variables


def resolve(init: str) -> tuple[str, str]:
    """resolve_checkpoint, except that a stage directory (which also holds the config.json of
    its run) is read as its checkpoints/, never as a Hugging Face directory."""
    checkpoints = os.path.join(os.path.expanduser(init), "checkpoints")
    return resolve_checkpoint(checkpoints if os.path.isdir(checkpoints) else init)


def read_meta(step_dir: str) -> dict:
    """The JSON meta of a step directory (stage, init, seed, config)."""
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.join(step_dir, META_ITEM)))


def build_model(model_kind: str, model_config: Any, reward_head: bool = False,
                lora: Optional[dict] = None, tokenizer=None) -> tuple[Any, Callable]:
    """(model, init_variables(rng)) of a 'video_llm' or 'llama' config dict; `reward_head` and
    `lora` ({'rank', 'alpha', 'targets'}) are set on top (how to run, not what was trained).
    With a tokenizer, a video LLM's vocabulary, special ids and `<image>` id are the tokenizer's
    (as the SFT stage sets them on its preset)."""
    from rlaif_jax.models.llama import Llama, LlamaConfig
    from rlaif_jax.models.lora import LoraConfig

    values = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if model_kind == "video_llm" and tokenizer is not None:
        from rlaif_jax.data import conversation
        llm = dict(values["llm"].to_dict() if hasattr(values["llm"], "to_dict")
                   else values["llm"])
        llm.update(vocab_size=conversation.vocabulary_size(tokenizer),
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        values = dict(values, llm=llm, image_token_id=conversation.image_token_id(tokenizer))
    if model_kind == "video_llm":
        from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig
        config = VideoLLMConfig.from_dict(values)
        changes = {"reward_head": True} if reward_head else {}
        if lora is not None:
            changes["llm"] = config.llm.replace(lora=LoraConfig(**dict(lora)))
        model = VideoLLM(config.replace(**changes))
    elif model_kind == "llama":
        if reward_head:
            raise ConfigError("a reward model needs model_kind='video_llm' (the reward head "
                              "lives in the video LLM)")
        config = LlamaConfig.from_dict(values)
        if lora is not None:
            config = config.replace(lora=LoraConfig(**dict(lora)))
        model = Llama(config)
    else:
        raise ConfigError(f"model_kind={model_kind!r}: expected 'video_llm' or 'llama'")
    return model, lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))


def stage_config(init: str) -> tuple[str, dict]:
    """(step directory, the config its stage ran with) of an orbax `init`."""
    kind, path = resolve(init)
    if kind != "step":
        raise CheckpointError(f"{init}: expected a stage or step directory, found {kind}")
    meta = read_meta(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: its meta holds no config; cannot rebuild the model")
    return path, meta["config"]


def load_stage_model(init: str, mesh, rules, reward_head: bool = False,
                     lora: Optional[dict] = None, tokenizer=None) -> tuple[Any, dict]:
    """(model, variables placed on `mesh`) of an earlier stage's checkpoint (or an HF dir)."""
    from rlaif_jax.train.state import plan_state

    kind, path = resolve(init)
    if kind == "hf":
        import rlaif_jax
        from rlaif_jax.parallel.sharding import shard_params
        import jax
        model, params = rlaif_jax.from_pretrained(path)
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 8), jnp.int32)))
        return model, {"params": shard_params(params, boxed["params"], mesh, rules)}
    step_dir, config = stage_config(init)
    model, init_variables = build_model(config.get("model_kind", "llama"), config["model"],
                                        reward_head, lora, tokenizer)
    layout = plan_state(init_variables, optax.identity(), mesh, rules, ".*", "", 1.0)
    return model, starting_variables(step_dir, layout, init_variables, int(config.get("seed", 0)))
