"""The multimodal projector from vision features to the LLM's width, as LLaVA builds it.

`linear`: one Linear(vision_width, H). `mlp{N}x_gelu`: Linear(vision_width, H), then N-1 times
exact (erf) GELU + Linear(H, H) (LLaVA-1.5 uses mlp2x_gelu). The Linears are named `linear_0`,
`linear_1`, ... in order (LLaVA's `mm_projector.{0,2,..}`, HF Llava's `linear_{1,2}`).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlaif_jax.models.lora import Projection

_MLP = re.compile(r"mlp(\d+)x_gelu")


def projector_depth(projector_type: str) -> int:
    """Number of Linear layers of a projector type; a clear error for an unknown one."""
    if projector_type == "linear":
        return 1
    match = _MLP.fullmatch(projector_type)
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ValueError(
        f"projector type {projector_type!r} is not supported: use 'linear' or 'mlp<N>x_gelu'")


class Projector(nn.Module):
    projector_type: str
    features: int  # the LLM's hidden size
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        depth = projector_depth(self.projector_type)
        proj = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Projection(self.features, (None, "embed"), name="linear_0", **proj)(x)
        for i in range(1, depth):
            x = jax.nn.gelu(x, approximate=False)
            x = Projection(self.features, ("mlp", "embed"), name=f"linear_{i}", **proj)(x)
        return x
