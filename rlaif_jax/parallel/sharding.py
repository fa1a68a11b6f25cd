"""Logical axis rules and the shardings of params, optimizer state and batches.

Params carry logical axis names (`nn.with_logical_partitioning`); a rules table maps each name to
mesh axes. The table is config: `config.rules` overrides entries of DEFAULT_RULES in place (the
order is the priority when two dimensions of one array want the same mesh axis). A dimension
that a mesh axis does not divide is left unsharded (jit rejects uneven shardings of arguments);
`check_replicated_share` then says whether too much stayed replicated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlaif_jax.parallel.mesh import ConfigError

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    # params
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    # A LoRA adapter's rank dimension. Rules apply in this order and a mesh axis once per array,
    # so the rank takes 'fsdp' only where the other dimension did not ('embed' comes first):
    # lora_a [embed, rank] -> ('fsdp', None), lora_b [rank, heads] -> ('fsdp', 'tensor').
    ("lora_rank", "fsdp"),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# The batch axis of every input array.
BATCH_AXES = ("data", "fsdp")


def make_rules(overrides: Optional[Iterable[Sequence[Any]]] = None) -> Rules:
    """DEFAULT_RULES with the given (name, mesh_axes) pairs replacing or adding entries."""
    rules = dict(DEFAULT_RULES)
    for entry in overrides or ():
        if len(entry) != 2:
            raise ConfigError(f"rules: entry {entry!r} is not a (logical_name, mesh_axes) pair")
        name, axes = entry
        rules[str(name)] = tuple(axes) if isinstance(axes, list) else axes
    return tuple(rules.items())


def _axes_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        fitted.append(axes if axes is not None and dim % _axes_size(mesh, axes) == 0 else None)
    return P(*fitted)


def logical_specs(abstract_boxed: Any) -> Any:
    """Tree of logical PartitionSpecs (axis names) of a boxed tree; unboxed leaves get P()."""
    return nn.get_partition_spec(abstract_boxed)


def mesh_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for the UNBOXED version of `abstract_boxed` (same tree, boxes removed)."""
    specs = logical_specs(abstract_boxed)
    unboxed = nn.unbox(abstract_boxed)
    is_spec = lambda x: isinstance(x, P)

    def one(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(spec, rules) if spec else P()
        return NamedSharding(mesh, _fit(mesh_spec, np.shape(leaf), mesh))

    return jax.tree.map(one, specs, unboxed, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch axis over ('data', 'fsdp'), other dims whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local: Mapping[str, Any], mesh: Mesh, global_rows: Optional[int] = None,
                 axes: Sequence[str] = BATCH_AXES) -> dict:
    """This process's rows of a batch -> global jax.Arrays whose first axis is split over the
    mesh's batch `axes` (the ones the mesh has). `global_rows`: the global batch size when the
    processes do not all hold the same number of rows."""
    axes = tuple(a for a in axes if a in mesh.axis_names)
    sharding = NamedSharding(mesh, P(axes or None))
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        shape = None if global_rows is None else (global_rows,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


def local_rows(rows: Mapping[str, Any]) -> dict:
    """This process's contiguous share of a batch that every process holds whole."""
    count, index = jax.process_count(), jax.process_index()
    per = len(next(iter(rows.values()))) // count
    return {k: v[index * per:(index + 1) * per] for k, v in rows.items()}


def replicated_share(abstract: Any, shardings: Any) -> tuple[float, list[tuple[str, int]]]:
    """(share of bytes fully replicated, [(path, bytes)] of replicated leaves, largest first)."""
    total, replicated_bytes, offenders = 0, 0, []
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(leaves, shard_leaves):
        size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += size
        if sharding.is_fully_replicated:
            replicated_bytes += size
            offenders.append((jax.tree_util.keystr(path), size))
    offenders.sort(key=lambda item: -item[1])
    return (replicated_bytes / total if total else 0.0), offenders


def check_replicated_share(abstract: Any, shardings: Any, mesh: Mesh, max_share: float = 0.02):
    """Fails when more than `max_share` of param bytes would be copied on every device."""
    if mesh.size <= 1:
        return
    share, offenders = replicated_share(abstract, shardings)
    if share > max_share:
        top = ", ".join(f"{path} ({size / 2**20:.1f} MiB)" for path, size in offenders[:3])
        raise ConfigError(
            f"{share:.1%} of parameter bytes stay replicated on mesh {dict(mesh.shape)} (limit "
            f"{max_share:.0%}; largest: {top}); change the mesh sizes or the rules, or raise "
            "sharding.max_replicated_share")


# The KV cache [layers, batch, slots, kv_heads, head_dim]: rows follow the batch, heads follow
# the k/v projections' output (sharded over 'tensor'), so a decode step needs no resharding.
CACHE_AXES = ("layers", "act_batch", "act_length", "act_heads", None)


def shard_params(params: Any, abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
    """Places raw (unboxed) params on the mesh following the logical axes of `abstract_boxed`."""
    return jax.device_put(params, mesh_shardings(abstract_boxed, mesh, rules))


def batch_divisor(mesh: Optional[Mesh]) -> int:
    """How many shards the batch axis is split into (rows must be a multiple of it)."""
    return 1 if mesh is None else _axes_size(mesh, BATCH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Optional[Mesh], rules: Rules):
    """The mesh and its logical-axis rules, so the constraints inside traced model code take
    effect; a no-op without a mesh."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x: Any, logical_axes: Sequence[Any], mesh: Optional[Mesh], rules: Rules) -> Any:
    """`with_sharding_constraint` by logical names; identity when not sharded."""
    if mesh is None:
        return x
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
