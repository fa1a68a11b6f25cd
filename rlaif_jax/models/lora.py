"""Linear projections that can carry a LoRA adapter inside the layer.

The base kernel lives in the `params` collection (frozen, shared by every adapter); the adapter
`lora_a` [in, r], `lora_b` [r, out] lives in the separate `lora` collection. Applying the model
with `{'params': base}` alone gives the base model; `{'params': base, 'lora': adapter}` gives
`x @ W + (alpha / r) * (x @ A) @ B`. Several named adapters are just several `lora` pytrees over
one base (`NamedAdapters`), so a policy and its frozen reference never duplicate the base
weights; `merge_lora` folds an adapter in for export only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

LORA_COLLECTION = "lora"
LLAMA_PROJECTIONS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The logical name of an adapter's rank dimension. Its rule (parallel/sharding.py) shards it
# over 'fsdp' wherever the other dimension has not taken 'fsdp' already: `lora_b` of q/k/v/gate/
# up and `lora_a` of o/down, whose other dimension follows 'heads' or 'mlp' ('tensor'), would
# otherwise be whole on every device of an fsdp-only mesh (2.5% of the 7B + 13B PPO job's bytes).
LORA_RANK_AXIS = "lora_rank"


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
        y = rows_matmul(x, kernel.astype(self.dtype))
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
            nn.with_logical_partitioning(nn.initializers.he_uniform(),
                                         (self.axes[0], LORA_RANK_AXIS)),
            rng, (in_features, rank), self.param_dtype,
        ).value
        b = self.variable(
            LORA_COLLECTION, "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros, (LORA_RANK_AXIS, self.axes[1])),
            rng, (rank, self.features), self.param_dtype,
        ).value
        # The low-rank products stay einsums over [..., in]: their transposed [r, rows] gradients
        # are small on CPU, and flattened they cost the v5e PPO update 0.38 GiB more temporaries
        # a chip (docs/benchmarks.md).
        low = jnp.einsum("...i,ir->...r", x, a.astype(self.dtype))
        return self.lora.scale * jnp.einsum("...r,ro->...o", low, b.astype(self.dtype))


def rows_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] -> [..., out], as one [rows, in] x [in, out] product.

    Why not `einsum("...i,io->...o")` on [B, L, in]: its weight gradient contracts two
    dimensions (B and L), and XLA:CPU then writes the incoming gradient transposed, [out, B*L],
    fused into the elementwise op that produces it (the SiLU gate's backward, 42 ms of a 320 ms
    layer on a 2-core Xeon; docs/benchmarks.md). With the rows flattened first (a free reshape)
    both operands keep their layouts. Merging B and L keeps B's sharding (L is never sharded);
    compiled ahead of time for v5e, the PPO update's memory is the same either way."""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.dot(rows, kernel).reshape(x.shape[:-1] + (kernel.shape[-1],))


def merge_lora(params: Any, adapter: Any, lora: LoraConfig) -> Any:
    """Returns params with W + scale * A @ B folded in (for export only: it copies the base).

    Works on any model's tree (a Llama's, or a VideoLLM's where the adapter sits under 'llm'),
    scanned (stacked) or not, boxed or raw.
    """
    params, adapter = nn.unbox(params), nn.unbox(adapter)

    def merge(base_node, adapter_node):
        if isinstance(adapter_node, dict) and "lora_a" in adapter_node:
            merged = dict(base_node)
            a, b = adapter_node["lora_a"], adapter_node["lora_b"]
            delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32),
                               b.astype(jnp.float32)) * lora.scale
            kernel = base_node["kernel"]
            merged["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
            return merged
        out = dict(base_node)
        for key, child in adapter_node.items():
            if key not in base_node:
                raise KeyError(f"adapter has {key!r} that the base params do not")
            out[key] = merge(base_node[key], child)
        return out

    return merge(params, adapter)


def with_lora_config(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """The same module (same params) whose projections use `lora` (rank, alpha, targets).

    Works for a Llama (config.lora) and a VideoLLM (config.llm.lora).
    """
    config = model.config
    if hasattr(config, "llm"):
        return model.clone(config=config.replace(llm=config.llm.replace(lora=lora)))
    return model.clone(config=config.replace(lora=lora))


def lora_config_of(model: nn.Module) -> LoraConfig:
    config = model.config
    return config.llm.lora if hasattr(config, "llm") else config.lora


def init_lora(model: nn.Module, rng: jax.Array, *args, **kwargs) -> Any:
    """A fresh adapter (A random, B zero) for `model`, whose LoRA config must have rank > 0.

    Runs `model.init` under jit and keeps only the 'lora' collection, so the base params are
    never materialised (XLA drops what is not returned). Returns raw (unboxed) arrays.
    """
    if lora_config_of(model).rank <= 0:
        raise ValueError("init_lora needs a model whose LoRA config has rank > 0")

    def init(key):
        return model.init(key, *args, **kwargs)[LORA_COLLECTION]

    return nn.unbox(jax.jit(init)(rng))


@flax.struct.dataclass
class NamedAdapters:
    """One frozen base and several named LoRA adapters over it (policy, reference, RM, value).

    Applying adapter `name` passes `{'params': base, 'lora': adapters[name]}`: the base arrays
    are shared by every adapter, never copied (the reference policy is the base plus its initial
    adapter, not a second base). `name=None` applies the base alone. `configs` may give an
    adapter its own rank/alpha/targets; otherwise the model's LoRA config is used. A pytree, so
    it can be passed through `jax.jit`.
    """

    base: Any
    adapters: dict = flax.struct.field(default_factory=dict)
    configs: dict = flax.struct.field(pytree_node=False, default_factory=dict)

    def add(self, name: str, adapter: Any, lora: Optional[LoraConfig] = None) -> "NamedAdapters":
        configs = dict(self.configs)
        if lora is not None:
            configs[name] = lora
        return self.replace(adapters={**self.adapters, name: adapter}, configs=configs)

    def variables(self, name: Optional[str]) -> dict:
        if name is None:
            return {"params": self.base}
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {sorted(self.adapters)}")
        return {"params": self.base, LORA_COLLECTION: self.adapters[name]}

    def model_for(self, model: nn.Module, name: Optional[str]) -> nn.Module:
        if name is not None and name in self.configs:
            return with_lora_config(model, self.configs[name])
        return model

    def apply(self, model: nn.Module, name: Optional[str], *args, **kwargs):
        """`model.apply` with adapter `name` (kwargs such as method= pass through)."""
        return self.model_for(model, name).apply(self.variables(name), *args, **kwargs)

    def merged(self, model: nn.Module, name: str) -> Any:
        """Base + adapter folded together: for export only (a full copy of the base)."""
        lora = self.configs.get(name, lora_config_of(model))
        return merge_lora(self.base, self.adapters[name], lora)
