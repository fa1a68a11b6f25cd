"""CLIP ViT vision tower (the semantics of `transformers`' `CLIPVisionModel`) in Flax Linen.

Patch embedding (a stride-p convolution, computed as one matmul over flattened patches), a class
token, learned position embeddings, a pre-LayerNorm, pre-norm encoder layers (quick_gelu MLP) and
a post-LayerNorm applied to the CLS token only (the pooled output). LLaVA-style features are the
hidden states after `select_layer` (HF's `hidden_states[select_layer]`, where index 0 is the
pre-LayerNorm'd embeddings), with the CLS token dropped (`patch`) or kept (`cls_patch`).

Frames come in as uint8 RGB [N, H, W, 3] already resized to `image_size`; `normalize_images`
turns them into CLIP's normalised floats on device (x / 255 - mean) / std.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlaif_jax.models.attention import dot_product_attention
from rlaif_jax.models.config_base import DtypeConfig
from rlaif_jax.models.llama import REMAT_POLICIES
from rlaif_jax.models.lora import Projection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
SELECT_FEATURES = ("patch", "cls_patch")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(DtypeConfig):
    _name = "CLIP vision"

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2  # HF hidden_states index: 0 = embeddings, -1 = last layer's output
    select_feature: str = "patch"  # 'patch' drops CLS, 'cls_patch' keeps it
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"select_feature={self.select_feature!r}: expected one of {SELECT_FEATURES}")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"select_layer={self.select_layer} is outside the {self.num_layers + 1} hidden "
                f"states of a {self.num_layers}-layer tower")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.check_dtypes()
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("image_mean and image_std need one value per channel")
        # ConfigDicts hand lists over; keep the dataclass hashable.
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1

    @property
    def num_features(self) -> int:
        """Tokens per image after `select_feature`."""
        return self.num_patches + (self.select_feature == "cls_patch")

    @property
    def selected_index(self) -> int:
        """`select_layer` as a non-negative index into the num_layers + 1 hidden states."""
        return self.select_layer % (self.num_layers + 1)



@flax.struct.dataclass
class ClipVisionOutput:
    last_hidden_state: jax.Array  # [N, 1 + patches, width], the last layer's output
    pooler_output: jax.Array  # [N, width], post-LayerNorm of the CLS token
    features: jax.Array  # [N, num_features, width] at select_layer / select_feature
    hidden_states: Optional[tuple]  # num_layers + 1 arrays (HF convention), when asked for


def normalize_images(images: jax.Array, config: ClipVisionConfig) -> jax.Array:
    """uint8 (or 0..255 float) RGB [..., H, W, C] -> CLIP-normalised float32 (on device)."""
    x = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(config.image_mean, jnp.float32)
    std = jnp.asarray(config.image_std, jnp.float32)
    return (x - mean) / std


class LayerNorm(nn.Module):
    """LayerNorm computed in float32, params named scale/bias with the 'norm' axis."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (features,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ClipAttention(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        batch, length, width = x.shape
        heads, head_dim = cfg.num_heads, width // cfg.num_heads
        proj = dict(use_bias=True, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        q = Projection(width, ("embed", "heads"), name="q_proj", **proj)(x)
        k = Projection(width, ("embed", "heads"), name="k_proj", **proj)(x)
        v = Projection(width, ("embed", "heads"), name="v_proj", **proj)(x)
        q, k, v = (t.reshape(batch, length, heads, head_dim) for t in (q, k, v))
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        out = dot_product_attention(q, k, v)  # full (bidirectional), scale head_dim^-0.5
        out = out.reshape(batch, length, width)
        return Projection(width, ("heads", "embed"), name="out_proj", **proj)(out)


class ClipMLP(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        proj = dict(use_bias=True, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        hidden = Projection(cfg.intermediate_size, ("embed", "mlp"), name="fc1", **proj)(x)
        hidden = ACTIVATIONS[cfg.hidden_act](hidden)
        hidden = nn.with_logical_constraint(hidden, ("act_batch", "act_length", "act_mlp"))
        return Projection(cfg.hidden_size, ("mlp", "embed"), name="fc2", **proj)(hidden)


class ClipEncoderLayer(nn.Module):
    """Pre-norm block, scannable: carry (x, selected) and the per-layer input `index`.

    `selected` keeps the output of layer `selected_index` (1-based, HF hidden_states index), so
    the features LLaVA reads come out of the scan without stacking every layer's output.
    """

    config: ClipVisionConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, carry, index):
        cfg = self.config
        x, selected = carry
        norm = dict(eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = x + ClipAttention(cfg, name="self_attn")(LayerNorm(name="layer_norm1", **norm)(x))
        x = x + ClipMLP(cfg, name="mlp")(LayerNorm(name="layer_norm2", **norm)(x))
        x = x.astype(cfg.compute_dtype)
        selected = jnp.where(index + 1 == cfg.selected_index, x, selected)
        return (x, selected), (x if self.collect_hidden else None)


class ClipVision(nn.Module):
    """CLIPVisionModel. `output_hidden_states=True` also returns every layer's output."""

    config: ClipVisionConfig
    output_hidden_states: bool = False

    def setup(self):
        cfg = self.config
        width = cfg.hidden_size
        self.class_embedding = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
            (width,), cfg.weight_dtype)
        # HWIO conv kernel: [patch, patch, channels, width]; a patch's pixels flatten row-major.
        self.patch_embedding = self.param(
            "patch_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, None, "embed")),
            (cfg.patch_size, cfg.patch_size, cfg.num_channels, width), cfg.weight_dtype)
        self.position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (cfg.num_positions, width), cfg.weight_dtype)
        norm = dict(eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.pre_layrnorm = LayerNorm(**norm)
        self.post_layernorm = LayerNorm(**norm)
        layer_cls = ClipEncoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                                 prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=0,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, collect_hidden=self.output_hidden_states, name="layers")
        else:
            self.layer_list = [
                layer_cls(cfg, collect_hidden=self.output_hidden_states, name=f"layers_{i}")
                for i in range(cfg.num_layers)]

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """Normalised pixels [N, H, W, C] -> [N, 1 + patches, width] (before pre_layrnorm)."""
        cfg = self.config
        n, height, width, channels = pixel_values.shape
        p, grid = cfg.patch_size, cfg.grid_size
        patches = pixel_values.reshape(n, grid, p, grid, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, p * p * channels)
        kernel = self.patch_embedding.reshape(p * p * channels, cfg.hidden_size)
        patch_embeds = jnp.einsum("npk,kd->npd", patches.astype(cfg.compute_dtype),
                                  kernel.astype(cfg.compute_dtype))
        cls = jnp.broadcast_to(self.class_embedding.astype(cfg.compute_dtype),
                               (n, 1, cfg.hidden_size))
        embeddings = jnp.concatenate([cls, patch_embeds], axis=1)
        return embeddings + self.position_embedding.astype(cfg.compute_dtype)[None]

    def __call__(self, images: jax.Array, normalized: bool = False) -> ClipVisionOutput:
        """images: uint8 RGB [N, H, W, C] (normalised here), or CLIP-normalised floats when
        `normalized=True`. H and W must equal `image_size` (no resizing in the model)."""
        cfg = self.config
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size,
                                                     cfg.num_channels):
            raise ValueError(
                f"vision tower expects images [N, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.num_channels}] (resized by the data layer), got {tuple(images.shape)}")
        pixels = images if normalized else normalize_images(images, cfg)
        x = self.pre_layrnorm(self.embed(pixels))
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        carry = (x, x)  # selected starts as hidden_states[0]
        layer_outputs = []
        if cfg.scan_layers:
            carry, stacked = self.layers(carry, jnp.arange(cfg.num_layers))
            if self.output_hidden_states:
                layer_outputs = [stacked[i] for i in range(cfg.num_layers)]
        else:
            for i, layer in enumerate(self.layer_list):
                carry, hidden = layer(carry, jnp.asarray(i))
                layer_outputs.append(hidden)
        last, selected = carry
        if cfg.select_feature == "patch":
            selected = selected[:, 1:]
        hidden_states = tuple([x] + layer_outputs) if self.output_hidden_states else None
        return ClipVisionOutput(
            last_hidden_state=last, pooler_output=self.post_layernorm(last[:, 0]),
            features=selected, hidden_states=hidden_states)
