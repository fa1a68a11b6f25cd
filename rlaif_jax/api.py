"""The public entry points: load any supported checkpoint, save ours back in HF form."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from rlaif_jax.checkpoints import hf
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.models.clip_vision import ClipVision
from rlaif_jax.models.llama import Llama
from rlaif_jax.models.lora import merge_lora
from rlaif_jax.models.video_llm import VideoLLM


HF_MODEL_TYPES = {"llama": hf.load_llama, "clip_vision_model": hf.load_clip_vision,
                  "clip": hf.load_clip_vision, "llava": hf.load_video_llm}


def from_pretrained(path: str, mesh=None, rules=None, tokenizer=None,
                    **config_overrides) -> tuple[Any, dict]:
    """Returns (model, params) of any checkpoint the project reads or writes:

    - a Hugging Face directory (`config.json` + safetensors), by its model_type: `llama` ->
      Llama; `clip_vision_model` or `clip` -> ClipVision (the vision half of a CLIPModel);
      `llava` (transformers' LlavaForConditionalGeneration, either key layout, or an original
      LLaVA checkpoint with `mm_*` keys) -> VideoLLM;
    - a stage directory of a workdir (`sft/`, `policy_init/`, `rm/`, `ppo/`, ...: its latest
      checkpoint), its `checkpoints/` directory or one step directory: the model that stage
      trained, built from the config saved with the checkpoint and laid over the base it was
      trained from. A LoRA adapter is merged into the params (the model keeps its LoRA config,
      so `{'params': params}` alone runs the trained model and an adapter may be added); an RM
      comes with its reward head; a PPO checkpoint gives its policy.

    `config_overrides` set fields of the model config, e.g. dtype='bfloat16', scan_layers=False;
    for the video LLM also pooling='none', num_frames=1, reward_head=True, llm={...} (and
    vision_tower=<CLIP dir> for an original LLaVA checkpoint without one).
    `mesh`, `rules`: params placed on `mesh`'s shards by the logical axis `rules` (default
    parallel/sharding.py DEFAULT_RULES); without a mesh, on the default device.
    `tokenizer`: a stage's vocabulary and special ids (default: the tokenizer its stage ran
    with, `tokenizer_path`); a Hugging Face directory's are in its config.json.
    """
    from rlaif_jax.checkpoints.orbax_io import resolve_checkpoint  # orbax: only when loading

    kind, resolved = resolve_checkpoint(path)
    if kind == "step":
        from rlaif_jax.engine.pretrained import load_stage
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
    import jax
    import jax.numpy as jnp

    from rlaif_jax.parallel.sharding import DEFAULT_RULES, shard_params
    # Read to host memory, then straight onto the shards.
    model, params = HF_MODEL_TYPES[model_type](resolved, place=lambda _, array: array,
                                               **config_overrides)
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    return model, shard_params(params, boxed["params"], mesh,
                               DEFAULT_RULES if rules is None else rules)


def tokenizer_path(path: str) -> str:
    """The tokenizer directory that goes with anything `from_pretrained` loads: a Hugging Face
    directory is its own; a stage or step directory's is the one its stage ran with."""
    from rlaif_jax.checkpoints.orbax_io import resolve_checkpoint

    kind, resolved = resolve_checkpoint(path)
    if kind == "hf":
        return resolved
    from rlaif_jax.engine.pretrained import stage_tokenizer_dir
    return stage_tokenizer_dir(resolved)


def save_pretrained(model: Any, params: dict, out_dir: str, dtype: str | None = None,
                    lora: Optional[dict] = None, **kwargs) -> None:
    """Writes `model`'s params as an HF directory that `transformers` loads.

    `lora`: an adapter pytree (the model's 'lora' collection) merged into a copy of the weights
    for the export (the only place a merged copy is made). kwargs go to the writer, e.g.
    layout='original' for the video LLM.
    """
    if lora is not None:
        lora_config = model.config.llm.lora if isinstance(model, VideoLLM) else model.config.lora
        params = merge_lora(params, lora, lora_config)
    if isinstance(model, Llama):
        hf.save_llama(model.config, params, out_dir, dtype=dtype, **kwargs)
    elif isinstance(model, ClipVision):
        hf.save_clip_vision(model.config, params, out_dir, dtype=dtype, **kwargs)
    elif isinstance(model, VideoLLM):
        hf.save_video_llm(model.config, params, out_dir, dtype=dtype, **kwargs)
    else:
        raise TypeError(f"save_pretrained does not know {type(model).__name__}")
