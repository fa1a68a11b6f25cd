"""A generic sharded train step: gradient accumulation, clipping, one optimizer update.

A stage supplies `loss_fn(variables, batch, rng) -> (loss_sum, sums)`: the loss SUMMED over its
weighting unit (tokens for SFT, pairs for the RM) and a dict of sums that includes 'weight' (the
number of units). Micro-batch gradients of the sums are added, then divided once by the total
weight, so accumulating k micro-batches gives exactly the gradient of the whole batch.
The step owns no I/O; it is a jit with explicit in/out shardings and a donated state (pjit).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rlaif_jax.parallel.sharding import BATCH_AXES
from rlaif_jax.engine.optim import merge_trees
from rlaif_jax.engine.state import StateLayout, TrainState
from rlaif_jax.parallel.sharding import mesh_context

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


class ShardedFunction:
    """A jitted function that is traced and run inside its mesh and logical-rules context."""

    def __init__(self, fn, layout: StateLayout):
        self._fn, self.layout = fn, layout

    def __call__(self, *args):
        with mesh_context(self.layout.mesh, self.layout.rules):
            return self._fn(*args)

    def lower(self, *args):
        with mesh_context(self.layout.mesh, self.layout.rules):
            return self._fn.lower(*args)


def _split_micro(batch: Mapping[str, jax.Array], accum_steps: int) -> dict:
    """[B, ...] -> [accum, B / accum, ...]; micro-batch i takes rows i, i + accum, ... so each
    device's contiguous block of rows splits locally (no data moves between devices)."""

    def split(x):
        micro = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        micro = jnp.swapaxes(micro, 0, 1)
        return jax.lax.with_sharding_constraint(micro, P(None, BATCH_AXES))

    return {k: split(v) for k, v in batch.items()}


def make_train_step(loss_fn: LossFn, layout: StateLayout, schedule: optax.Schedule,
                    accum_steps: int = 1) -> ShardedFunction:
    """(state, frozen, batch) -> (state, metrics); metrics are per-weight means, grad_norm
    (before clipping), lr and the weight (e.g. tokens) of the batch."""
    tx = layout.tx

    def grads_of(params, frozen, micro, rng):
        def total(params):
            loss_sum, sums = loss_fn(merge_trees(params, frozen), micro, rng)
            return loss_sum, sums

        (_, sums), grads = jax.value_and_grad(total, has_aux=True)(params)
        return grads, sums

    def step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            grads, sums = grads_of(state.params, frozen, batch, rng)
        else:
            micro = _split_micro(batch, accum_steps)

            def body(carry, xs):
                acc_grads, acc_sums = carry
                index, one = xs
                grads, sums = grads_of(state.params, frozen, one, jax.random.fold_in(rng, index))
                return (jax.tree.map(jnp.add, acc_grads, grads),
                        jax.tree.map(jnp.add, acc_sums, sums)), None

            zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            first = jax.tree.map(lambda x: x[0], micro)
            zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                lambda: grads_of(state.params, frozen, first, rng)[1]))
            (grads, sums), _ = jax.lax.scan(
                body, (zero_grads, zero_sums), (jnp.arange(accum_steps), micro))
        weight = jnp.maximum(sums["weight"], 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v.astype(jnp.float32) / weight for k, v in sums.items() if k != "weight"}
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics["weight"] = sums["weight"].astype(jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    replicated = NamedSharding(layout.mesh, P())
    batch_sharding = NamedSharding(layout.mesh, P(BATCH_AXES))  # a prefix for every batch leaf
    jitted = jax.jit(
        step,
        in_shardings=(layout.state_shardings, layout.frozen_shardings, batch_sharding),
        out_shardings=(layout.state_shardings, replicated),
        donate_argnums=(0,))
    return ShardedFunction(jitted, layout)


def make_eval_fn(fn: Callable[[Any, Mapping[str, jax.Array]], Any], layout: StateLayout,
                 ) -> ShardedFunction:
    """Jits `fn(variables, batch)` over (state.params, frozen, batch) with the layout's shardings;
    outputs stay where the compiler puts them (fetch with jax.device_get / process_allgather)."""

    def run(params, frozen, batch):
        return fn(merge_trees(params, frozen), batch)

    batch_sharding = NamedSharding(layout.mesh, P(BATCH_AXES))
    jitted = jax.jit(run, in_shardings=(layout.state_shardings.params, layout.frozen_shardings,
                                        batch_sharding))
    return ShardedFunction(jitted, layout)
