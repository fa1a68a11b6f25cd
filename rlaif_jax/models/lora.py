"""Linear projections that can carry a LoRA adapter inside the layer.

The base kernel lives in the `params` collection (frozen, shared by every adapter); the adapter
`lora_a` [in, r], `lora_b` [r, out] lives in the separate `lora` collection. Applying the model
with `{'params': base}` alone gives the base model; `{'params': base, 'lora': adapter}` gives
`x @ W + (alpha / r) * (x @ A) @ B`. Several named adapters are just several `lora` pytrees over
one base, so a policy and its frozen reference never duplicate the base weights.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_COLLECTION = "lora"
LLAMA_PROJECTIONS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0 disables LoRA; `targets` is a regex matched (fullmatch) against projection names."""

    rank: int = 0
    alpha: float = 16.0
    targets: str = LLAMA_PROJECTIONS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def applies_to(self, name: str) -> bool:
        return self.rank > 0 and re.fullmatch(self.targets, name) is not None


class Projection(nn.Module):
    """y = x @ kernel (+ LoRA). Kernel is [in, out] with logical axes `axes` = (in_axis, out_axis)."""

    features: int
    axes: tuple[str | None, str | None]
    lora: LoraConfig = LoraConfig()
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (in_features, self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,), self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        if self.lora.applies_to(self.name) and (
            self.is_initializing() or self.has_variable(LORA_COLLECTION, "lora_a")
        ):
            y = y + self._lora_delta(x, in_features)
        return y

    def _lora_delta(self, x, in_features):
        rank = self.lora.rank
        rng = self.make_rng("params") if self.is_initializing() else None
        a = self.variable(
            LORA_COLLECTION, "lora_a",
            nn.with_logical_partitioning(nn.initializers.he_uniform(), (self.axes[0], None)),
            rng, (in_features, rank), self.param_dtype,
        ).value
        b = self.variable(
            LORA_COLLECTION, "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1])),
            rng, (rank, self.features), self.param_dtype,
        ).value
        low = jnp.einsum("...i,ir->...r", x, a.astype(self.dtype))
        return self.lora.scale * jnp.einsum("...r,ro->...o", low, b.astype(self.dtype))


def merge_lora(params: Any, adapter: Any, lora: LoraConfig) -> Any:
    """Returns params with W + scale * A @ B folded in (for export only: it copies the base)."""

    def merge(base_node, adapter_node):
        if isinstance(adapter_node, dict) and "lora_a" in adapter_node:
            merged = dict(base_node)
            a, b = adapter_node["lora_a"], adapter_node["lora_b"]
            delta = jnp.einsum("...ir,...ro->...io", a, b) * lora.scale
            merged["kernel"] = (base_node["kernel"] + delta).astype(base_node["kernel"].dtype)
            return merged
        out = dict(base_node)
        for key, child in adapter_node.items():
            out[key] = merge(base_node[key], child)
        return out

    return merge(jax.tree_util.tree_map(lambda v: v, params), adapter)
