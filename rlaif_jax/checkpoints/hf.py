"""Hugging Face checkpoints <-> our params, by explicit name tables, both ways.

A table is a list of `TensorRule`s: our param path, the HF key (with `{i}` for a layer index),
and the layout change between them (`transpose` for a torch Linear's [out, in] weight). Per-layer
tensors are stacked on axis 0 of our scanned params, or spread over `layers_{i}` when a model is
built unscanned. Loading reads one tensor at a time and fills a preallocated stacked array, so
the host never holds a model twice. RoPE keeps HF's rotate-half layout: q and k are not permuted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors
from rlaif_jax.models.clip_vision import ACTIVATIONS, ClipVision, ClipVisionConfig
from rlaif_jax.models.config_base import DTYPES
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.models.lora import LoraConfig
from rlaif_jax.models.projector import projector_depth
from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig

# ours <- hf, and hf <- ours, for each layout.
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda a: a, lambda a: a),
    "transpose": (lambda a: a.T, lambda a: a.T),
    # torch Conv2d [out, in, kh, kw] <-> our HWIO [kh, kw, in, out]
    "conv_hwio": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    ours: str  # '/'-joined path in our params; the segment `layer_segment` is the layer stack
    hf: str  # HF key; `{i}` is the layer index for per-layer tensors
    layout: str = "copy"
    per_layer: bool = False
    layer_segment: str = "layers"


# Buffers some HF checkpoints carry that are recomputed, not learned.
IGNORED_HF_KEYS = (r".*rotary_emb\.inv_freq", r".*position_ids")


def llama_rules(config: LlamaConfig, hf_prefix: str = "model.", ours_prefix: str = "",
                lm_head_key: str = "lm_head.weight") -> list[TensorRule]:
    p, o = hf_prefix, ours_prefix
    rules = [
        TensorRule(f"{o}embed_tokens", f"{p}embed_tokens.weight"),
        TensorRule(f"{o}norm/scale", f"{p}norm.weight"),
    ]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(TensorRule(f"{o}layers/self_attn/{name}/kernel",
                                f"{p}layers.{{i}}.self_attn.{name}.weight", "transpose", True))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(TensorRule(f"{o}layers/mlp/{name}/kernel",
                                f"{p}layers.{{i}}.mlp.{name}.weight", "transpose", True))
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append(TensorRule(f"{o}layers/{name}/scale", f"{p}layers.{{i}}.{name}.weight",
                                "copy", True))
    if not config.tie_word_embeddings:
        rules.append(TensorRule(f"{o}lm_head/kernel", lm_head_key, "transpose"))
    return rules


# ---------------------------------------------------------------------------------------------
# Config translation


def llama_config_from_hf(hf: dict, **overrides) -> LlamaConfig:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError("attention_bias / mlp_bias LLaMA variants are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) is supported")
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise CheckpointError(f"rope type {rope_type!r} is not supported (default or linear)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    eos = hf.get("eos_token_id", 2)
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    if values["head_dim"] == values["hidden_size"] // values["num_heads"]:
        values["head_dim"] = None
    values.update(overrides)
    return LlamaConfig(**values)


def llama_config_to_hf(config: LlamaConfig) -> dict:
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling_factor != 1.0:
        rope = {"rope_theta": config.rope_theta, "rope_type": "linear",
                "factor": config.rope_scaling_factor}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": config.param_dtype,
    }


# ---------------------------------------------------------------------------------------------
# Tensors


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return tree


def _layer_path(rule: TensorRule, i: int) -> str:
    parts = rule.ours.split("/")
    at = parts.index(rule.layer_segment)
    parts[at] = f"{rule.layer_segment}_{i}"
    return "/".join(parts)


def _depth(rule: TensorRule, num_layers: int | dict[str, int]) -> int:
    """How many layers a per-layer rule spans (by our-path prefix when a model has two stacks)."""
    if isinstance(num_layers, int):
        return num_layers
    return next(n for prefix, n in num_layers.items() if rule.ours.startswith(prefix))


def write_hf_directory(directory: str, hf_config: dict, params: Any, rules: list[TensorRule],
                       num_layers: int | dict[str, int], dtype: Optional[str] = None,
                       max_shard_bytes: int = 5 << 30) -> None:
    """config.json + safetensors (one tensor at a time off the device), as transformers reads."""
    if dtype is not None:
        hf_config = dict(hf_config, torch_dtype=dtype)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    tensors = export_tensors(nn.unbox(params), rules, num_layers, DTYPES[dtype] if dtype else None)
    write_safetensors(tensors, directory, max_shard_bytes)


def load_params(
    reader: SafetensorsReader,
    rules: list[TensorRule],
    abstract_params: Any,
    num_layers: int | dict[str, int],
    place: Optional[Callable[[str, np.ndarray], jax.Array]] = None,
    ignore: tuple[str, ...] = IGNORED_HF_KEYS,
) -> dict:
    """Fills the param tree described by `abstract_params` (ShapeDtypeStructs) from `reader`.

    Every param must be covered by a rule and every checkpoint tensor consumed (or ignored);
    a missing, extra or mis-shaped tensor raises CheckpointError naming it.
    `num_layers` may map a rule's `layer_segment` path prefix to its depth when a model has two
    layer stacks (e.g. vision tower and LLM).
    """
    expected = _flat(abstract_params)
    place = place or (lambda path, array: jnp.asarray(array))
    filled: dict[str, Any] = {}
    consumed: set[str] = set()

    def read(key, to_ours, want_shape, dtype):
        array = to_ours(reader.get(key))
        if tuple(array.shape) != tuple(want_shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(array.shape)} (after layout change) but the "
                f"model expects {tuple(want_shape)}")
        consumed.add(key)
        return array.astype(dtype)

    for rule in rules:
        to_ours = LAYOUTS[rule.layout][0]
        if not rule.per_layer or rule.ours in expected:  # a single or a stacked (scanned) tensor
            if rule.ours not in expected:
                raise CheckpointError(f"no model param {rule.ours!r} for tensor {rule.hf!r}")
            want = expected[rule.ours]
            if rule.per_layer:
                stacked = np.empty(want.shape, want.dtype)
                for i in range(_depth(rule, num_layers)):
                    stacked[i] = read(rule.hf.format(i=i), to_ours, want.shape[1:], want.dtype)
            else:
                stacked = read(rule.hf, to_ours, want.shape, want.dtype)
            filled[rule.ours] = place(rule.ours, stacked)
            del stacked
        else:  # unscanned layers: layers_0, layers_1, ...
            for i in range(_depth(rule, num_layers)):
                path = _layer_path(rule, i)
                if path not in expected:
                    raise CheckpointError(f"no model param {path!r} for tensor {rule.hf.format(i=i)!r}")
                array = read(rule.hf.format(i=i), to_ours, expected[path].shape, expected[path].dtype)
                filled[path] = place(path, array)

    uncovered = sorted(set(expected) - set(filled))
    if uncovered:
        raise CheckpointError(f"model params with no tensor in the checkpoint: {uncovered[:5]}")
    extra = [k for k in reader.keys()
             if k not in consumed and not any(re.fullmatch(p, k) for p in ignore)]
    if extra:
        raise CheckpointError(
            f"checkpoint has tensors the model does not use: {extra[:5]}"
            + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""))
    return _unflat(filled)


def export_tensors(params: Any, rules: list[TensorRule], num_layers: int | dict[str, int],
                   dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (hf_key, array) one tensor at a time (device -> host per tensor)."""
    flat = _flat(params)

    def host(x):
        array = np.asarray(jax.device_get(x))
        return array.astype(dtype) if dtype is not None else array

    for rule in rules:
        to_hf = LAYOUTS[rule.layout][1]
        if rule.ours in flat:
            array = host(flat[rule.ours])
            if rule.per_layer:
                for i in range(_depth(rule, num_layers)):
                    yield rule.hf.format(i=i), np.ascontiguousarray(to_hf(array[i]))
            else:
                yield rule.hf, np.ascontiguousarray(to_hf(array))
        elif rule.per_layer:
            for i in range(_depth(rule, num_layers)):
                yield rule.hf.format(i=i), np.ascontiguousarray(to_hf(host(flat[_layer_path(rule, i)])))
        else:
            raise CheckpointError(f"params have no {rule.ours!r}")


# ---------------------------------------------------------------------------------------------
# LLaMA


def abstract_params(model: nn.Module, *args) -> Any:
    """Shapes and dtypes of the model's params (boxed with logical axes), never materialised."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))["params"]


def load_llama(directory: str, place=None, **config_overrides) -> tuple[Llama, dict]:
    with open(os.path.join(directory, "config.json")) as f:
        hf_config = json.load(f)
    config = llama_config_from_hf(hf_config, **config_overrides)
    model = Llama(config)
    abstract = nn.unbox(abstract_params(model, jnp.zeros((1, 1), jnp.int32)))
    params = load_params(SafetensorsReader(directory), llama_rules(config), abstract,
                         config.num_layers, place)
    return model, params


def save_llama(config: LlamaConfig, params: Any, directory: str, dtype: Optional[str] = None,
               max_shard_bytes: int = 5 << 30) -> None:
    """Writes config.json + safetensors that `transformers.LlamaForCausalLM` loads."""
    write_hf_directory(directory, llama_config_to_hf(config), params, llama_rules(config),
                       config.num_layers, dtype, max_shard_bytes)


# ---------------------------------------------------------------------------------------------
# CLIP vision tower (CLIPVisionModel, and the vision half of CLIPModel)

# transformers' CLIPVisionConfig defaults, for configs that leave fields out.
CLIP_VISION_HF_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# LlavaConfig's defaults for its vision_config (CLIP ViT-L/14 at 336 px).
LLAVA_VISION_HF_DEFAULTS = dict(
    CLIP_VISION_HF_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14)
# LlamaConfig's defaults, for the sparse text_config of some Llava configs.
LLAMA_HF_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048)
# Tensors of a CLIPModel that are not the vision tower.
CLIP_TEXT_KEYS = (r"text_model\..*", r"text_projection\..*", r"visual_projection\..*",
                  r"logit_scale")
# Where the vision tower's tensors may sit (probe: `{prefix}embeddings.class_embedding`).
CLIP_VISION_PREFIXES = ("vision_model.", "")


def clip_vision_rules(config: ClipVisionConfig, hf_prefix: str = "vision_model.",
                      ours_prefix: str = "") -> list[TensorRule]:
    p, o = hf_prefix, ours_prefix
    rules = [
        TensorRule(f"{o}class_embedding", f"{p}embeddings.class_embedding"),
        TensorRule(f"{o}patch_embedding", f"{p}embeddings.patch_embedding.weight", "conv_hwio"),
        TensorRule(f"{o}position_embedding", f"{p}embeddings.position_embedding.weight"),
    ]
    for norm in ("pre_layrnorm", "post_layernorm"):
        rules += [TensorRule(f"{o}{norm}/scale", f"{p}{norm}.weight"),
                  TensorRule(f"{o}{norm}/bias", f"{p}{norm}.bias")]
    layer = f"{p}encoder.layers.{{i}}."
    for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")),
                         ("mlp", ("fc1", "fc2"))):
        for name in names:
            rules += [
                TensorRule(f"{o}layers/{block}/{name}/kernel", f"{layer}{block}.{name}.weight",
                           "transpose", True),
                TensorRule(f"{o}layers/{block}/{name}/bias", f"{layer}{block}.{name}.bias",
                           "copy", True)]
    for norm in ("layer_norm1", "layer_norm2"):
        rules += [TensorRule(f"{o}layers/{norm}/scale", f"{layer}{norm}.weight", "copy", True),
                  TensorRule(f"{o}layers/{norm}/bias", f"{layer}{norm}.bias", "copy", True)]
    return rules


def clip_vision_config_from_hf(hf: dict, defaults: dict = CLIP_VISION_HF_DEFAULTS,
                               **overrides) -> ClipVisionConfig:
    hf = dict(defaults, **{k: v for k, v in hf.items() if v is not None})
    if hf["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(f"CLIP hidden_act={hf['hidden_act']!r} is not supported "
                              f"({sorted(ACTIVATIONS)})")
    values = dict(
        image_size=hf["image_size"], patch_size=hf["patch_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_channels=hf["num_channels"],
        layer_norm_eps=hf["layer_norm_eps"], hidden_act=hf["hidden_act"])
    values.update(overrides)
    return ClipVisionConfig(**values)


def clip_vision_config_to_hf(config: ClipVisionConfig) -> dict:
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_channels": config.num_channels,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "torch_dtype": config.param_dtype,
    }


def _find_prefix(reader: SafetensorsReader, candidates, probe: str) -> Optional[str]:
    return next((p for p in candidates if f"{p}{probe}" in reader), None)


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{directory}: no config.json; expected a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def _clip_vision_source(directory: str) -> tuple[dict, SafetensorsReader, str, tuple]:
    """(vision config dict, reader, key prefix, keys to ignore) of a CLIPVisionModel/CLIPModel."""
    hf_config = _read_config(directory)
    reader = SafetensorsReader(directory)
    if hf_config.get("model_type") == "clip":
        vision, ignore = hf_config.get("vision_config") or {}, CLIP_TEXT_KEYS
    else:
        vision, ignore = hf_config, ()
    prefix = _find_prefix(reader, CLIP_VISION_PREFIXES, "embeddings.class_embedding")
    if prefix is None:
        raise CheckpointError(f"{directory}: no CLIP vision tower tensors "
                              "(looked for vision_model.embeddings.class_embedding)")
    return vision, reader, prefix, ignore


def load_clip_vision(directory: str, place=None, **config_overrides) -> tuple[ClipVision, dict]:
    """A CLIPVisionModel directory, or the vision half of a CLIPModel one."""
    vision, reader, prefix, ignore = _clip_vision_source(directory)
    config = clip_vision_config_from_hf(vision, **config_overrides)
    model = ClipVision(config)
    size = config.image_size
    abstract = nn.unbox(abstract_params(model, jnp.zeros((1, size, size, config.num_channels),
                                                         jnp.uint8)))
    params = load_params(reader, clip_vision_rules(config, prefix), abstract, config.num_layers,
                         place, ignore=IGNORED_HF_KEYS + ignore)
    return model, params


def save_clip_vision(config: ClipVisionConfig, params: Any, directory: str,
                     dtype: Optional[str] = None, max_shard_bytes: int = 5 << 30) -> None:
    """Writes a directory that `transformers.CLIPVisionModel` loads (hub key layout)."""
    write_hf_directory(directory, clip_vision_config_to_hf(config), params,
                       clip_vision_rules(config), config.num_layers, dtype, max_shard_bytes)


# ---------------------------------------------------------------------------------------------
# Video LLM <- LLaVA checkpoints (original LLaVA, and transformers' LlavaForConditionalGeneration)
#
# Key layouts, as (llm prefix, lm_head key, vision prefixes, projector keys):
#   hf_new   : model.language_model.*, lm_head.weight, model.vision_tower.[vision_model.]*,
#              model.multi_modal_projector.linear_{1,2}.*        (transformers >= 4.52 in memory)
#   hf_old   : language_model.model.*, language_model.lm_head.weight,
#              vision_tower.[vision_model.]*, multi_modal_projector.linear_{1,2}.*  (the hub's)
#   original : model.*, lm_head.weight, model.vision_tower.vision_tower.vision_model.*,
#              model.mm_projector.{0,2,..}.* (mlpNx_gelu) or model.mm_projector.* (linear)

LLAVA_LAYOUTS = {
    "hf_new": ("model.language_model.", "lm_head.weight",
               ("model.vision_tower.vision_model.", "model.vision_tower.")),
    "hf_old": ("language_model.model.", "language_model.lm_head.weight",
               ("vision_tower.vision_model.", "vision_tower.")),
    "original": ("model.", "lm_head.weight", ("model.vision_tower.vision_tower.vision_model.",
                                              "model.vision_tower.vision_model.")),
}
# Our extra config.json entry: what HF configs cannot say about the video model.
RLAIF_VIDEO_KEY = "rlaif_video"
RLAIF_VIDEO_FIELDS = ("pooling", "num_frames", "image_token_id", "freeze_vision")


def projector_rules(projector_type: str, layout: str, ours_prefix: str = "projector/",
                    bias: bool = True) -> list[TensorRule]:
    depth = projector_depth(projector_type)
    if layout == "original":
        names = ["model.mm_projector"] if projector_type == "linear" else [
            f"model.mm_projector.{2 * i}" for i in range(depth)]
    else:
        if projector_type != "mlp2x_gelu":
            raise CheckpointError(f"transformers' Llava holds an mlp2x_gelu projector only, not "
                                  f"{projector_type!r}; export it in the 'original' layout")
        prefix = "model.multi_modal_projector" if layout == "hf_new" else "multi_modal_projector"
        names = [f"{prefix}.linear_1", f"{prefix}.linear_2"]
    rules = []
    for i, name in enumerate(names):
        rules.append(TensorRule(f"{ours_prefix}linear_{i}/kernel", f"{name}.weight", "transpose"))
        if bias:
            rules.append(TensorRule(f"{ours_prefix}linear_{i}/bias", f"{name}.bias"))
    return rules


def video_llm_rules(config: VideoLLMConfig, layout: str, vision_prefix: Optional[str] = None,
                    with_vision: bool = True) -> list[TensorRule]:
    llm_prefix, lm_head_key, vision_prefixes = LLAVA_LAYOUTS[layout]
    rules = llama_rules(config.llm, llm_prefix, "llm/", lm_head_key)
    rules += projector_rules(config.projector_type, layout, bias=config.projector_bias)
    if with_vision:
        rules += clip_vision_rules(config.vision, vision_prefix or vision_prefixes[0], "vision/")
    return rules


def split_video_llm_overrides(overrides: dict) -> tuple[dict, dict, dict]:
    """Splits model config overrides into (video LLM fields, llm fields, vision fields).

    Keys naming a field of the LLaMA and/or CLIP config (e.g. dtype, scan_layers) go to each
    config that has it; `llm=` / `vision=` dicts go to one; anything else is an error.
    """
    top_fields = {f.name for f in dataclasses.fields(VideoLLMConfig)} - {"llm", "vision"}
    llm_fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    vision_fields = {f.name for f in dataclasses.fields(ClipVisionConfig)}
    top, llm, vision = {}, {}, {}
    for key, value in overrides.items():
        if key == "llm":
            llm.update(value)
        elif key == "vision":
            vision.update(value)
        elif key in top_fields:
            top[key] = value
        elif key in llm_fields or key in vision_fields:
            if key in llm_fields:
                llm[key] = value
            if key in vision_fields:
                vision[key] = value
        else:
            raise CheckpointError(f"unknown override {key!r}: not a field of the video LLM, "
                                  "LLaMA or CLIP config")
    if isinstance(llm.get("lora"), dict):
        llm["lora"] = LoraConfig(**llm["lora"])
    return top, llm, vision


def _video_llm_config(hf: dict, llm: LlamaConfig, vision: ClipVisionConfig, top: dict,
                      default_image_token: int, projector_type: str, projector_bias: bool
                      ) -> VideoLLMConfig:
    saved = {k: v for k, v in (hf.get(RLAIF_VIDEO_KEY) or {}).items() if k in RLAIF_VIDEO_FIELDS}
    values = dict(pooling="spatiotemporal", num_frames=50, image_token_id=default_image_token)
    values.update(saved)
    values.update(projector_type=projector_type, projector_bias=projector_bias)
    values.update(top)
    return VideoLLMConfig(vision=vision, llm=llm, **values)


def video_llm_config_from_llava_hf(hf: dict, **overrides) -> VideoLLMConfig:
    top, llm_over, vision_over = split_video_llm_overrides(overrides)
    text = dict(LLAMA_HF_DEFAULTS, **(hf.get("text_config") or {}))
    if text.get("model_type", "llama") != "llama":
        raise CheckpointError(f"Llava text model {text['model_type']!r}: only llama is supported")
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    vision_hf = hf.get("vision_config") or {}
    if vision_hf.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"Llava vision tower {vision_hf['model_type']!r}: only CLIP")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer={layer!r}: only a single layer is supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"vision_feature_select_strategy={strategy!r} is not supported")
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"projector_hidden_act={act!r}: only exact gelu (mlp2x_gelu)")
    vision = clip_vision_config_from_hf(
        vision_hf, LLAVA_VISION_HF_DEFAULTS, select_layer=layer,
        select_feature="patch" if strategy == "default" else "cls_patch", **vision_over)
    llm = llama_config_from_hf(text, **llm_over)
    image_token = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return _video_llm_config(hf, llm, vision, top, image_token, "mlp2x_gelu",
                             bool(hf.get("multimodal_projector_bias", True)))


def video_llm_config_to_llava_hf(config: VideoLLMConfig) -> dict:
    text = llama_config_to_hf(config.llm)
    text.pop("architectures")
    vision = clip_vision_config_to_hf(config.vision)
    vision.pop("architectures")
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": config.image_token_id,
        "image_seq_length": config.vision.num_features,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": config.vision.select_layer,
        "vision_feature_select_strategy":
            "default" if config.vision.select_feature == "patch" else "full",
        "tie_word_embeddings": config.llm.tie_word_embeddings,
        "torch_dtype": config.llm.param_dtype,
        RLAIF_VIDEO_KEY: {k: getattr(config, k) for k in RLAIF_VIDEO_FIELDS},
    }


def video_llm_config_to_llava_original(config: VideoLLMConfig) -> dict:
    hf = llama_config_to_hf(config.llm)
    hf.update({
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "mm_projector_type": config.projector_type,
        "mm_hidden_size": config.vision.hidden_size,
        "mm_vision_select_layer": config.vision.select_layer,
        "mm_vision_select_feature": config.vision.select_feature,
        "mm_vision_tower": "rlaif_vision_config",
        "rlaif_vision_config": clip_vision_config_to_hf(config.vision),
        RLAIF_VIDEO_KEY: {k: getattr(config, k) for k in RLAIF_VIDEO_FIELDS},
    })
    return hf


def _infer_clip_vision_config(reader: SafetensorsReader, prefix: str) -> dict:
    """CLIP shapes read off the tensors (heads: width / 64, as every OpenAI CLIP ViT has)."""
    patch = reader.get(f"{prefix}embeddings.patch_embedding.weight").shape  # [out, in, p, p]
    positions = reader.get(f"{prefix}embeddings.position_embedding.weight").shape[0]
    fc1 = reader.get(f"{prefix}encoder.layers.0.mlp.fc1.weight").shape
    layers = 0
    while f"{prefix}encoder.layers.{layers}.mlp.fc1.weight" in reader:
        layers += 1
    grid = int(round((positions - 1) ** 0.5))
    return dict(hidden_size=patch[0], num_channels=patch[1], patch_size=patch[2],
                image_size=grid * patch[2], intermediate_size=fc1[0], num_hidden_layers=layers,
                num_attention_heads=max(1, patch[0] // 64))


def _is_original_llava(hf: dict) -> bool:
    return "text_config" not in hf and any(
        k in hf for k in ("mm_projector_type", "mm_hidden_size", "mm_vision_tower"))


def load_video_llm(directory: str, place=None, vision_tower: Optional[str] = None,
                   **config_overrides) -> tuple[VideoLLM, dict]:
    """A LLaVA checkpoint (original or transformers') as our VideoLLM.

    The video settings (pooling, frames, placeholder id) come from our `rlaif_video` config
    entry when the checkpoint was written by us, else they default to the project's video model
    (spatio-temporal pooling, 50 frames); override any of them, e.g. pooling='none'.
    An original LLaVA checkpoint without vision tower tensors takes them from `vision_tower`
    (a CLIP directory), else from `mm_vision_tower` when that is a local directory.
    """
    hf = _read_config(directory)
    reader = SafetensorsReader(directory)
    vision_reader, vision_ignore = reader, ()
    if _is_original_llava(hf):
        layout = "original"
        top, llm_over, vision_over = split_video_llm_overrides(config_overrides)
        vision_prefix = _find_prefix(reader, LLAVA_LAYOUTS[layout][2], "embeddings.class_embedding")
        external = vision_tower or hf.get("mm_vision_tower")
        if "rlaif_vision_config" in hf:
            vision_hf = hf["rlaif_vision_config"]
        elif vision_prefix is None and external and os.path.isdir(external):
            vision_hf = None  # read below with its weights
        elif vision_prefix is not None:
            vision_hf = _infer_clip_vision_config(reader, vision_prefix)
        else:
            raise CheckpointError(
                f"{directory}: no vision tower tensors and mm_vision_tower={external!r} is not "
                "a local directory; pass vision_tower=<a CLIP model directory>")
        if vision_prefix is None:
            if not (external and os.path.isdir(external)):
                raise CheckpointError(f"{directory}: no vision tower tensors; pass "
                                      "vision_tower=<a CLIP model directory>")
            ext_hf, vision_reader, vision_prefix, vision_ignore = _clip_vision_source(external)
            vision_hf = vision_hf or ext_hf
        select = dict(select_layer=hf.get("mm_vision_select_layer", -2),
                      select_feature=hf.get("mm_vision_select_feature", "patch"))
        vision = clip_vision_config_from_hf(vision_hf, **dict(select, **vision_over))
        mm_hidden = hf.get("mm_hidden_size", vision.hidden_size)
        if mm_hidden != vision.hidden_size:
            raise CheckpointError(f"mm_hidden_size={mm_hidden} but the vision tower is "
                                  f"{vision.hidden_size} wide")
        llm = llama_config_from_hf(hf, **llm_over)
        config = _video_llm_config(hf, llm, vision, top, llm.vocab_size,
                                   hf.get("mm_projector_type", "linear"), True)
    else:
        if hf.get("model_type") != "llava":
            raise CheckpointError(f"{directory}: not a LLaVA checkpoint")
        config = video_llm_config_from_llava_hf(hf, **config_overrides)
        layout = "hf_new" if any(k.startswith("model.language_model.") for k in reader.keys()) \
            else "hf_old"
        vision_prefix = _find_prefix(reader, LLAVA_LAYOUTS[layout][2], "embeddings.class_embedding")
        if vision_prefix is None:
            raise CheckpointError(f"{directory}: no vision tower tensors in the {layout} layout")

    heads = dict(reward_head=config.reward_head, value_head=config.value_head)
    bare = config.replace(reward_head=False, value_head=False)
    abstract = nn.unbox(abstract_params(VideoLLM(bare), jnp.zeros((1, 1), jnp.int32)))
    depths = {"llm/": config.llm.num_layers, "vision/": config.vision.num_layers}
    if vision_reader is reader:
        params = load_params(reader, video_llm_rules(bare, layout, vision_prefix), abstract,
                             depths, place)
    else:
        vision_abstract = abstract.pop("vision")
        params = load_params(reader, video_llm_rules(bare, layout, with_vision=False), abstract,
                             depths, place)
        params["vision"] = load_params(
            vision_reader, clip_vision_rules(config.vision, vision_prefix), vision_abstract,
            config.vision.num_layers, place, ignore=IGNORED_HF_KEYS + vision_ignore)
    model = VideoLLM(config)
    if any(heads.values()):
        params.update(init_heads(model))
    return model, params


def init_heads(model: VideoLLM, seed: int = 0) -> dict:
    """Fresh params of the model's reward/value heads only (HF checkpoints carry none)."""
    names = [n for n in ("reward_head", "value_head") if getattr(model.config, n)]

    def init():
        params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
        return {n: params[n] for n in names}  # jit drops everything else

    return nn.unbox(jax.jit(init)())


def save_video_llm(config: VideoLLMConfig, params: Any, directory: str,
                   dtype: Optional[str] = None, layout: str = "auto",
                   max_shard_bytes: int = 5 << 30) -> str:
    """Writes the video LLM as a LLaVA checkpoint; returns the layout written.

    `hf` (transformers' LlavaForConditionalGeneration, the hub's key layout) needs an
    mlp2x_gelu projector and a placeholder id inside the vocabulary (transformers looks it up
    in the embedding table); `original` (LLaVA's own layout) takes any projector and any id.
    `auto` picks `hf` when it can. Reward/value heads are not exported.
    """
    if layout == "auto":
        fits_hf = (config.projector_type == "mlp2x_gelu"
                   and 0 <= config.image_token_id < config.llm.vocab_size)
        layout = "hf" if fits_hf else "original"
    if layout == "hf":
        if not 0 <= config.image_token_id < config.llm.vocab_size:
            raise CheckpointError(
                f"image_token_id={config.image_token_id} is outside the vocabulary "
                f"({config.llm.vocab_size}); transformers' Llava cannot embed it: use "
                "layout='original'")
        hf_config, rules_layout = video_llm_config_to_llava_hf(config), "hf_old"
        vision_prefix = "vision_tower.vision_model."
    elif layout == "original":
        hf_config, rules_layout = video_llm_config_to_llava_original(config), "original"
        vision_prefix = None
    else:
        raise ValueError(f"layout={layout!r}: expected 'auto', 'hf' or 'original'")
    depths = {"llm/": config.llm.num_layers, "vision/": config.vision.num_layers}
    write_hf_directory(directory, hf_config, params,
                       video_llm_rules(config, rules_layout, vision_prefix), depths, dtype,
                       max_shard_bytes)
    return layout
