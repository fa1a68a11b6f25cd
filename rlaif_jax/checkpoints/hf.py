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
from rlaif_jax.models.llama import DTYPES, Llama, LlamaConfig

# ours <- hf, and hf <- ours, for each layout.
LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda a: a, lambda a: a),
    "transpose": (lambda a: a.T, lambda a: a.T),
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

    def depth(rule):
        if isinstance(num_layers, int):
            return num_layers
        return next(n for prefix, n in num_layers.items() if rule.ours.startswith(prefix))

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
                for i in range(depth(rule)):
                    stacked[i] = read(rule.hf.format(i=i), to_ours, want.shape[1:], want.dtype)
            else:
                stacked = read(rule.hf, to_ours, want.shape, want.dtype)
            filled[rule.ours] = place(rule.ours, stacked)
            del stacked
        else:  # unscanned layers: layers_0, layers_1, ...
            for i in range(depth(rule)):
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

    def depth(rule):
        if isinstance(num_layers, int):
            return num_layers
        return next(n for prefix, n in num_layers.items() if rule.ours.startswith(prefix))

    def host(x):
        array = np.asarray(jax.device_get(x))
        return array.astype(dtype) if dtype is not None else array

    for rule in rules:
        to_hf = LAYOUTS[rule.layout][1]
        if rule.ours in flat:
            array = host(flat[rule.ours])
            if rule.per_layer:
                for i in range(depth(rule)):
                    yield rule.hf.format(i=i), np.ascontiguousarray(to_hf(array[i]))
            else:
                yield rule.hf, np.ascontiguousarray(to_hf(array))
        elif rule.per_layer:
            for i in range(depth(rule)):
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
    os.makedirs(directory, exist_ok=True)
    hf_config = llama_config_to_hf(config)
    if dtype is not None:
        hf_config["torch_dtype"] = dtype
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    tensors = export_tensors(nn.unbox(params), llama_rules(config), config.num_layers,
                             DTYPES[dtype] if dtype else None)
    write_safetensors(tensors, directory, max_shard_bytes)
