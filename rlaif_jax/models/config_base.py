"""What every model config dataclass shares: dtype names, `replace`, and a strict `from_dict`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# Model fields that say how to run, not what the weights are: a stage's config may set them on
# top of a checkpoint's own config (e.g. remat 'full' for a real job's memory plan).
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def plain_dict(values: Any) -> dict:
    """A dict from a dict or an ml_collections ConfigDict."""
    return dict(values.to_dict() if hasattr(values, "to_dict") else values)


class ModelConfig:
    """Mixin for frozen config dataclasses; `_name` names the model in error messages."""

    _name = "model"

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def checked_values(cls, values: Any) -> dict:
        """`values` as a plain dict; a key that is not a field fails, naming it."""
        values = plain_dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls._name} config keys {unknown}; known: {sorted(known)}")
        return values

    @classmethod
    def from_dict(cls, values: Any):
        """From a plain dict or ConfigDict (e.g. a `configs/models.py` preset); unknown keys fail."""
        return cls(**cls.checked_values(values))


class DtypeConfig(ModelConfig):
    """For configs with `dtype` (compute) and `param_dtype` fields named as in DTYPES."""

    def check_dtypes(self) -> None:
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {sorted(DTYPES)}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]
