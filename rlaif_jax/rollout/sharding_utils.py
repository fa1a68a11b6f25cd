"""The few sharding helpers the sampler needs, kept local to `rollout/`.

`rlaif_jax/parallel/` (mesh.py, sharding.py) is the project's home for meshes and logical rules;
it was being written at the same time as this module, so the sampler carries its own small copy
of what it uses. When both exist, the lead folds these into `parallel/` and this module imports
from there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, as fixed in the helper brief (DEFAULT_RULES of parallel/sharding.py).
GENERATION_RULES: tuple = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# The KV cache [layers, batch, slots, kv_heads, head_dim]: rows follow the batch, heads follow
# the k/v projections' output (sharded over 'tensor'), so a decode step needs no resharding.
CACHE_AXES = ("layers", "act_batch", "act_length", "act_heads", None)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh sizes {sizes} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh sizes {sizes} need {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_sharding(mesh: Mesh, rules, logical_axes) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def _divisible_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """Drops the mesh axes of any dimension they do not divide (e.g. a vocab of 32001)."""
    axes = []
    for dim, names in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        group = () if names is None else ((names,) if isinstance(names, str) else tuple(names))
        ways = int(np.prod([mesh.shape[n] for n in group])) if group else 1
        axes.append(names if dim % ways == 0 else None)
    return PartitionSpec(*axes)


def param_shardings(boxed_params: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for params boxed with logical axis names (abstract is fine).

    A dimension its mesh axes do not divide is replicated instead of failing.
    """
    specs = nn.get_partition_spec(boxed_params)
    mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(tuple(s), rules), specs,
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed_params))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _divisible_spec(spec, shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params: Any, boxed_abstract: Any, mesh: Mesh, rules) -> Any:
    """Places raw (unboxed) params on the mesh following the logical axes of `boxed_abstract`."""
    return jax.device_put(params, param_shardings(boxed_abstract, mesh, rules))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Rows over the batch axes, every other dimension replicated."""
    return logical_sharding(mesh, rules, ("act_batch",) + (None,) * (ndim - 1))


def batch_divisor(mesh: Optional[Mesh], rules) -> int:
    """How many shards the batch axis is split into (rows must be a multiple of it)."""
    if mesh is None:
        return 1
    spec = nn.logical_to_mesh_axes(("act_batch",), rules)[0]
    if spec is None:
        return 1
    names = (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([mesh.shape[name] for name in names]))


@contextlib.contextmanager
def sharding_context(mesh: Optional[Mesh], rules):
    """Activates the model's logical constraints (they are no-ops without a mesh and rules)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, logical_axes, mesh: Optional[Mesh], rules) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when not sharded."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, rules, logical_axes))


def to_host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


__all__ = ["GENERATION_RULES", "CACHE_AXES", "make_mesh", "param_shardings", "shard_params",
           "batch_sharding", "batch_divisor", "sharding_context", "constrain", "logical_sharding",
           "PartitionSpec"]
