"""The public entry points: load any supported checkpoint, save ours back in HF form."""

from __future__ import annotations

import json
import os
from typing import Any

from rlaif_jax.checkpoints import hf
from rlaif_jax.checkpoints.safetensors_io import CheckpointError
from rlaif_jax.models.llama import Llama


def from_pretrained(path: str, **config_overrides) -> tuple[Any, dict]:
    """Returns (model, params) from an HF directory (`config.json` + safetensors).

    `config_overrides` set fields of the model config, e.g. dtype='bfloat16', scan_layers=False.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "llama":
        return hf.load_llama(path, **config_overrides)
    raise CheckpointError(f"{path}: model_type {model_type!r} is not supported")


def save_pretrained(model: Any, params: dict, out_dir: str, dtype: str | None = None) -> None:
    """Writes `model`'s params as an HF directory that `transformers` loads."""
    if isinstance(model, Llama):
        hf.save_llama(model.config, params, out_dir, dtype=dtype)
        return
    raise TypeError(f"save_pretrained does not know {type(model).__name__}")
