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


def from_pretrained(path: str, **config_overrides) -> tuple[Any, dict]:
    """Returns (model, params) from an HF directory (`config.json` + safetensors).

    Dispatch on config.json: `llama` -> Llama; `clip_vision_model` or `clip` -> ClipVision (the
    vision half of a CLIPModel); `llava` (transformers' LlavaForConditionalGeneration, either key
    layout, or an original LLaVA checkpoint with `mm_*` keys) -> VideoLLM.
    `config_overrides` set fields of the model config, e.g. dtype='bfloat16', scan_layers=False;
    for the video LLM also pooling='none', num_frames=1, vision_tower=<CLIP dir>, llm={...}.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "llama":
        return hf.load_llama(path, **config_overrides)
    if model_type in ("clip_vision_model", "clip"):
        return hf.load_clip_vision(path, **config_overrides)
    if model_type == "llava":
        return hf.load_video_llm(path, **config_overrides)
    raise CheckpointError(f"{path}: model_type {model_type!r} is not supported")


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
