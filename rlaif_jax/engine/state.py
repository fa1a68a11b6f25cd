"""Train state, and its sharded creation without ever materialising it on one device.

The state holds only what training changes: the trainable params, their optimizer state, the
step and an RNG key. Frozen variables (a pretrained base under LoRA, a frozen vision tower) are a
separate tree passed to the step and never donated, differentiated or checkpointed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from rlaif_jax.parallel import sharding as sharding_lib
from rlaif_jax.parallel.sharding import mesh_context
from rlaif_jax.engine.optim import merge_trees, split_trainable


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any  # trainable variables, a dict of collections ({'params': ...}, {'lora': ...})
    opt_state: Any
    rng: jax.Array  # uint32 [2]; a step derives its keys by fold_in(rng, step)


@dataclasses.dataclass
class StateLayout:
    """Abstract shapes and shardings of a stage's state and frozen variables."""

    mesh: Mesh
    rules: tuple
    tx: optax.GradientTransformation
    trainable: str
    frozen: str
    abstract_state: TrainState  # unboxed ShapeDtypeStructs
    abstract_frozen: Any
    state_shardings: TrainState
    frozen_shardings: Any

    @property
    def abstract_state_sharded(self) -> TrainState:
        """ShapeDtypeStructs carrying their shardings (the restore target for orbax)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def split(self, variables):
        return split_trainable(variables, self.trainable, self.frozen)


def plan_state(init_variables: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               mesh: Mesh, rules, trainable: str, frozen: str = "",
               max_replicated_share: float = 0.02) -> StateLayout:
    """Traces `init_variables(rng) -> boxed variables` (no FLOPs, no memory) and derives the
    shardings of the train state and the frozen tree from the params' logical axis names."""
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    boxed = jax.eval_shape(init_variables, rng)
    train_boxed, frozen_boxed = split_trainable(boxed, trainable, frozen)
    if not jax.tree.leaves(train_boxed):
        raise sharding_lib.ConfigError(
            f"trainable={trainable!r} frozen={frozen!r} leave no trainable parameter")
    opt_boxed = jax.eval_shape(tx.init, train_boxed)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state_boxed = TrainState(step=scalar, params=train_boxed, opt_state=opt_boxed, rng=rng)
    state_shardings = sharding_lib.mesh_shardings(state_boxed, mesh, rules)
    frozen_shardings = sharding_lib.mesh_shardings(frozen_boxed, mesh, rules)
    abstract_params = nn.unbox(merge_trees(train_boxed, frozen_boxed))
    params_shardings = merge_trees(state_shardings.params, frozen_shardings)
    sharding_lib.check_replicated_share(abstract_params, params_shardings, mesh,
                                        max_replicated_share)
    return StateLayout(mesh=mesh, rules=rules, tx=tx, trainable=trainable, frozen=frozen,
                       abstract_state=nn.unbox(state_boxed), abstract_frozen=nn.unbox(frozen_boxed),
                       state_shardings=state_shardings, frozen_shardings=frozen_shardings)


def init_state(layout: StateLayout, init_variables: Callable[[jax.Array], Any],
               rng: jax.Array) -> tuple[TrainState, Any]:
    """Random init of everything, computed in place on its shards by one jitted function."""

    def create(rng):
        variables = nn.unbox(init_variables(rng))
        train, frozen = layout.split(variables)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=train,
                           opt_state=layout.tx.init(train), rng=rng)
        return state, frozen

    with mesh_context(layout.mesh, layout.rules):
        create = jax.jit(create, out_shardings=(layout.state_shardings, layout.frozen_shardings))
        return create(jnp.asarray(rng, jnp.uint32))


def place(array: Any, sharding: NamedSharding) -> jax.Array:
    """A host array (the full global value, on every process) onto its sharding."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def state_from_variables(layout: StateLayout, variables: Any, rng: jax.Array,
                         ) -> tuple[TrainState, Any]:
    """A fresh state (step 0, new optimizer) around given variables (e.g. loaded weights).
    Every leaf of the layout must be present: nothing is silently left random."""
    train, frozen = layout.split(variables)
    train = _placed(train, layout.abstract_state.params, layout.state_shardings.params, "trainable")
    frozen = _placed(frozen, layout.abstract_frozen, layout.frozen_shardings, "frozen")
    with mesh_context(layout.mesh, layout.rules):
        opt_init = jax.jit(layout.tx.init, out_shardings=layout.state_shardings.opt_state)
        opt_state = opt_init(train)
    state = TrainState(
        step=place(np.zeros((), np.int32), layout.state_shardings.step), params=train,
        opt_state=opt_state, rng=place(np.asarray(rng, np.uint32), layout.state_shardings.rng))
    return state, frozen


def _placed(values, abstract, shardings, what):
    want = jax.tree_util.tree_structure(abstract)
    got = jax.tree_util.tree_structure(values)
    if want != got:
        missing = sorted(set(_paths(abstract)) - set(_paths(values)))
        extra = sorted(set(_paths(values)) - set(_paths(abstract)))
        raise sharding_lib.ConfigError(
            f"{what} variables do not match the model: missing {missing[:3]}, extra {extra[:3]}")

    def one(value, spec, sharding):
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value.astype(spec.dtype)
        value = np.asarray(value)
        if value.shape != spec.shape:
            raise sharding_lib.ConfigError(
                f"{what} variable has shape {value.shape}, the model expects {spec.shape}")
        return place(value.astype(spec.dtype), sharding)

    return jax.tree.map(one, values, abstract, shardings)


def _paths(tree):
    return ["/".join(str(getattr(k, "key", k)) for k in p)
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
