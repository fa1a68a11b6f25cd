"""The public entry points: load any supported checkpoint, save ours back in HF form."""

from __future__ import annotations

from typing import Any, Optional

from rlaif_jax.checkpoints import hf
from rlaif_jax.engine.pretrained import load_model, tokenizer_dir
from rlaif_jax.models.clip_vision import ClipVision
from rlaif_jax.models.llama import Llama
from rlaif_jax.models.lora import merge_lora
from rlaif_jax.models.video_llm import VideoLLM


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
    return load_model(path, mesh, rules, tokenizer, **config_overrides)


def tokenizer_path(path: str) -> str:
    """The tokenizer directory that goes with anything `from_pretrained` loads: a Hugging Face
    directory is its own; a stage or step directory's is the one its stage ran with."""
    return tokenizer_dir(path)


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
