"""LLaMA / Vicuna decoder as a pure Flax Linen module, numerically matching `transformers`.

Parameters carry logical axis names (see `rlaif_jax/parallel/sharding.py` for the rules that map
them to mesh axes). Layers are scanned (`nn.scan`) by default so a 40-layer model compiles as fast
as a 2-layer one; `remat_policy` picks what the backward pass recomputes. The KV cache is an
explicit pytree `{'k', 'v'}` of shape [layers, batch, cache_len, kv_heads, head_dim] passed in and
returned, never hidden module state: the layers read it, and one update after the layer loop
writes every layer's new slots in place (models/kv_cache.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlaif_jax.models import kv_cache
from rlaif_jax.models.attention import cached_attention, chunk_attention, decode_attention
from rlaif_jax.models.fused_attention import IMPLEMENTATIONS, causal_attention, resolve
from rlaif_jax.models.config_base import DtypeConfig
from rlaif_jax.models.kv_cache import init_cache  # noqa: F401 -- re-exported for the sampler
from rlaif_jax.models.lora import LoraConfig, Projection
from rlaif_jax.models.target_logprobs import target_log_probs

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DtypeConfig):
    _name = "LLaMA"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None  # None: same as num_heads (MHA)
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear RoPE scaling: positions / factor
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # How full-sequence forwards (training, scoring, prefill) attend: one of
    # fused_attention.IMPLEMENTATIONS ('auto' picks per platform; see models/fused_attention.py).
    attention_impl: str = "auto"
    # > 0: the 'blocked' implementation's query blocks (tokens), which skip the masked upper
    # triangle (models/attention.py); 'auto' on CPU uses it when > 0, else dense 'xla'.
    attention_block: int = 0
    # Run the Pallas kernels ('splash', 'pallas_gpu') in the Pallas interpreter (CPU tests).
    attention_interpret: bool = False
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.check_dtypes()
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of "
                             f"{IMPLEMENTATIONS}")
        if self.attention_impl == "blocked" and self.attention_block <= 0:
            raise ValueError("attention_impl='blocked' needs attention_block > 0 (its block size)")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, values: dict) -> "LlamaConfig":
        """From a plain dict or ConfigDict (e.g. a `configs/models.py` preset); unknown keys fail."""
        values = cls.checked_values(values)
        if isinstance(values.get("lora"), dict) or hasattr(values.get("lora"), "to_dict"):
            lora = values["lora"]
            values["lora"] = LoraConfig(**(lora.to_dict() if hasattr(lora, "to_dict") else lora))
        return cls(**values)


@flax.struct.dataclass
class LlamaOutput:
    logits: Optional[jax.Array]  # [B, L, vocab] float32, None when compute_logits=False
    last_hidden_state: jax.Array  # [B, L, H] after the final norm
    hidden_states: Optional[tuple]  # embeddings, then each layer's output (HF convention)
    cache: Optional[dict]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that start at 0 on each row's first real token (right for left padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def rope_cos_sin(position_ids: jax.Array, config: LlamaConfig):
    """cos, sin of shape [B, L, head_dim] in the rotate-half layout (frequencies repeated)."""
    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    positions = position_ids.astype(jnp.float32) / config.rope_scaling_factor
    angles = positions[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, L, heads, head_dim]; rotate-half as in transformers (no q/k permutation)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, token_mask, cos, sin, cache=None, layer_index=None,
                 cache_index=None):
        """Returns (output, (k, v)): this chunk's keys and values [B, L, kv_heads, head_dim],
        which the caller writes into the cache after the layer loop. With a cache (the whole
        [layers, ...] buffer, as it was before this chunk) the chunk attends over the layer's
        earlier slots and over itself."""
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        proj = dict(lora=cfg.lora, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        q = Projection(heads * head_dim, ("embed", "heads"), name="q_proj", **proj)(x)
        k = Projection(kv_heads * head_dim, ("embed", "kv_heads"), name="k_proj", **proj)(x)
        v = Projection(kv_heads * head_dim, ("embed", "kv_heads"), name="v_proj", **proj)(x)
        q = q.reshape(batch, length, heads, head_dim)
        k = k.reshape(batch, length, kv_heads, head_dim)
        v = v.reshape(batch, length, kv_heads, head_dim)
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None and kv_cache.is_per_layer(cache):
            # The CPU decode loop's cache: write this chunk into the layer's own buffers, then
            # attend over them (models/kv_cache.py: to_layers).
            layer = kv_cache.write_layer(kv_cache.layer_of(cache, layer_index), cache_index, k, v)
            out = cached_attention(q, layer["k"], layer["v"], mask, layer.get("k_scale"),
                                   layer.get("v_scale"))
            out = out.reshape(batch, length, heads * head_dim)
            out = Projection(cfg.hidden_size, ("heads", "embed"), name="o_proj", **proj)(out)
            return out, layer

        slots = None if cache is None else cache["k"].shape[2]
        if cache is None or slots == length:
            # No cache, or a chunk that fills the whole cache from slot 0 (a prefill): causal
            # attention of the chunk over itself.
            out = self.full_sequence_attention(q, k, v, mask, token_mask)
        else:
            # The cache does not hold this chunk yet: attend over its earlier slots plus the
            # chunk's own keys (the slots being written are masked out of the cached part).
            cached_k, cached_v, k_scale, v_scale = kv_cache.read(cache, layer_index)
            earlier = mask & (jnp.arange(slots) < cache_index)
            if length == 1:
                out = decode_attention(q, cached_k, cached_v, earlier, k, v, k_scale, v_scale)
            else:
                own_mask = jax.lax.dynamic_slice_in_dim(mask, cache_index, length, axis=-1)
                out = chunk_attention(q, cached_k, cached_v, earlier, k, v, own_mask,
                                      k_scale, v_scale)
        out = out.reshape(batch, length, heads * head_dim)
        out = Projection(cfg.hidden_size, ("heads", "embed"), name="o_proj", **proj)(out)
        return out, (k, v)

    def full_sequence_attention(self, q, k, v, mask, token_mask):
        """Causal attention of a whole sequence over itself (training forwards, prefill), by
        `attention_impl`. mask: the dense [B, 1, T, T] mask; token_mask [B, T]: real tokens."""
        cfg = self.config
        impl = resolve(cfg.attention_impl, cfg.compute_dtype, cfg.dim_per_head,
                       cfg.attention_block)
        if impl == "blocked" and not 0 < cfg.attention_block < q.shape[1]:
            impl = "xla"  # one block would be the dense computation
        return causal_attention(q, k, v, token_mask, mask, impl, cfg.attention_block,
                                interpret=cfg.attention_interpret)


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        proj = dict(lora=cfg.lora, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        gate = Projection(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **proj)(x)
        up = Projection(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **proj)(x)
        hidden = nn.with_logical_constraint(
            nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return Projection(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **proj)(hidden)


class DecoderLayer(nn.Module):
    """One pre-norm block; signature (carry, per-layer inputs) so it can be scanned. The KV
    cache comes in whole and read-only; the layer returns its new keys and values."""

    config: LlamaConfig
    collect_hidden: bool = False

    @nn.compact
    def __call__(self, x, mask, token_mask, cos, sin, layer_index, cache, cache_index):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        attn_out, new_kv = Attention(cfg, name="self_attn")(
            RMSNorm(name="input_layernorm", **norm)(x), mask, token_mask, cos, sin, cache,
            layer_index, cache_index)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(RMSNorm(name="post_attention_layernorm", **norm)(x))
        x = x.astype(cfg.compute_dtype)
        return x, (new_kv if cache is not None else None, x if self.collect_hidden else None)


def unstack_layers(tree: dict, num_layers: int) -> dict:
    """A scanned Llama's variables of one collection ({'layers': [layers, ...] leaves, ...}) as
    the same model's unscanned ones ({'layers_0': ..., 'layers_1': ..., ...})."""
    if "layers" not in tree:
        return tree
    tree = dict(tree)
    stacked = tree.pop("layers")
    for i in range(num_layers):
        tree[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return tree


def attention_mask_4d(attention_mask, query_slots, key_slots):
    """Boolean [B, 1, Lq, S]: causal by slot index, and the key must be a real token."""
    causal = key_slots[None, :] <= query_slots[:, None]
    return (causal[None, None] & attention_mask[:, None, None, :].astype(bool))


class Llama(nn.Module):
    """LlamaForCausalLM. `inputs_embeds` (e.g. with video tokens spliced in) replaces the lookup.

    `output_hidden_states=True` makes a module (same params) that also returns every layer's
    output; it is a module attribute because scanned layers must know it when they are built.
    """

    config: LlamaConfig
    output_hidden_states: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype)
        layer_cls = DecoderLayer
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "lora": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0,
                         nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, collect_hidden=self.output_hidden_states, name="layers")
        else:
            self.layer_list = [
                layer_cls(cfg, collect_hidden=self.output_hidden_states, name=f"layers_{i}")
                for i in range(cfg.num_layers)]
        self.norm = RMSNorm(
            eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name="norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = Projection(
                cfg.vocab_size, ("embed", "vocab"), dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype, name="lm_head")

    def embed(self, input_ids: jax.Array) -> jax.Array:
        embeddings = jnp.take(self.embed_tokens, input_ids, axis=0)
        return embeddings.astype(self.config.compute_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            weight = self.embed_tokens.astype(self.config.compute_dtype)
            logits = jnp.einsum("...h,vh->...v", hidden, weight)
        else:
            logits = self.lm_head(hidden)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        return logits.astype(jnp.float32)

    def target_log_probs(self, hidden: jax.Array, targets: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
        """log p(target) [B, L] float32 and whether the target is the top logit [B, L], read
        from final hidden states [B, L, H] without returning the [B, L, vocab] logits: the head
        and the log-probability are one op (models/target_logprobs.py) whose backward pass is
        cheaper than the logits' one. Targets must be valid ids (mask ignored positions after).
        The head never carries a LoRA adapter, so its kernel is the whole head."""
        if self.config.tie_word_embeddings:
            kernel = self.embed_tokens.T
        else:
            kernel = nn.unbox(self.lm_head.variables["params"]["kernel"])
        return target_log_probs(hidden.astype(self.config.compute_dtype), kernel, targets)

    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        attention_mask: Optional[jax.Array] = None,
        position_ids: Optional[jax.Array] = None,
        inputs_embeds: Optional[jax.Array] = None,
        cache: Optional[dict] = None,
        cache_index: Optional[jax.Array] = None,
        compute_logits: bool = True,
    ) -> LlamaOutput:
        """Forward pass.

        Without a cache: causal attention over the L given tokens, `attention_mask` [B, L].
        With a cache of length S: the L tokens are written at slots cache_index.., and
        `attention_mask` [B, S] marks which cache slots hold real tokens (the caller keeps it).
        The cache is the stacked one (`init_cache`) or, with unscanned layers, the per-layer
        one of `kv_cache.to_layers` (the CPU decode loop's), returned in the same form.
        """
        cfg = self.config
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if cache is not None:
            if cache_index is None or attention_mask is None:
                raise ValueError("a cache needs cache_index and the attention_mask over its slots")
            query_slots = cache_index + jnp.arange(length)
            key_slots = jnp.arange(kv_cache.num_slots(cache))
        else:
            cache_index = jnp.zeros((), jnp.int32)
            query_slots = key_slots = jnp.arange(length)
        if attention_mask is None:
            attention_mask = jnp.ones((batch, key_slots.shape[0]), jnp.int32)
        if position_ids is None:
            if cache is not None:
                raise ValueError("with a cache, pass position_ids explicitly")
            position_ids = positions_from_mask(attention_mask)
        mask = attention_mask_4d(attention_mask, query_slots, key_slots)
        cos, sin = rope_cos_sin(position_ids, cfg)

        x = inputs_embeds.astype(cfg.compute_dtype)
        layer_outputs = []
        layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        per_layer_cache = cache is not None and kv_cache.is_per_layer(cache)
        if per_layer_cache and cfg.scan_layers:
            raise ValueError("a per-layer cache (kv_cache.to_layers) needs scan_layers=False")
        if cfg.scan_layers:
            x, (new_kv, stacked) = self.layers(x, mask, attention_mask, cos, sin, layer_indices,
                                               cache, cache_index)
            if self.output_hidden_states:
                layer_outputs = [stacked[i] for i in range(cfg.num_layers)]
        else:
            new_kv = []
            for i, layer in enumerate(self.layer_list):
                x, (layer_kv, hidden) = layer(x, mask, attention_mask, cos, sin, i, cache,
                                              cache_index)
                new_kv.append(layer_kv)
                layer_outputs.append(hidden)
        if cache is None:
            new_cache = None
        elif per_layer_cache:  # each layer wrote its own buffers
            new_cache = kv_cache.from_layers(new_kv)
        else:
            if not cfg.scan_layers:
                new_kv = jax.tree.map(lambda *a: jnp.stack(a), *new_kv)
            # Every layer's keys and values go into the cache in one update after the layer
            # loop, so no layer's slice is copied or re-stacked. With scanned layers the write
            # follows the loop, hence every read, and XLA updates the donated / loop-carried
            # cache in place.
            new_cache = kv_cache.write(cache, cache_index, *new_kv)
        hidden = self.norm(x)
        hidden_states = None
        if self.output_hidden_states:
            hidden_states = tuple([inputs_embeds] + layer_outputs[:-1] + [hidden])
        logits = self.logits(hidden) if compute_logits else None
        return LlamaOutput(logits=logits, last_hidden_state=hidden, hidden_states=hidden_states,
                           cache=new_cache)
