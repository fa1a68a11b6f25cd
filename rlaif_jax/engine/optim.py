"""Optimizer: AdamW, warmup then cosine or constant, global-norm clipping, and freezing.

Freezing splits the variables into a trainable tree (which gets gradients and optimizer state
and is checkpointed) and a frozen tree (passed to the step as is, never differentiated), by a
regex over '/'-joined paths that start with the collection: 'params/vision/.*', 'lora/.*'.
So a frozen 7B base costs neither gradient nor Adam memory, and LoRA-only is `trainable='lora/.*'`.
"""

from __future__ import annotations

import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlaif_jax.parallel.mesh import ConfigError


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def split_trainable(variables: Mapping, trainable: str, frozen: str = "") -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts with disjoint leaves; a leaf is trainable when its path
    fullmatches `trainable` and does not fullmatch `frozen`. Works on boxed or plain trees."""
    try:
        train_re, frozen_re = re.compile(trainable), re.compile(frozen) if frozen else None
    except re.error as e:
        raise ConfigError(f"trainable/frozen regex: {e}") from None

    def walk(node, prefix):
        if not isinstance(node, Mapping) or _is_box(node):
            name = "/".join(prefix)
            keep = train_re.fullmatch(name) and not (frozen_re and frozen_re.fullmatch(name))
            return (node, None) if keep else (None, node)
        train, freeze = {}, {}
        for key, child in node.items():
            t, f = walk(child, prefix + [str(key)])
            if t is not None:
                train[key] = t
            if f is not None:
                freeze[key] = f
        return train or None, freeze or None

    train, freeze = walk(dict(variables), [])
    return train or {}, freeze or {}


def merge_trees(a: Mapping, b: Mapping) -> dict:
    """Union of two nested dicts with disjoint leaves (the inverse of split_trainable)."""
    out = dict(a)
    for key, child in b.items():
        if key in out and isinstance(out[key], Mapping) and isinstance(child, Mapping):
            out[key] = merge_trees(out[key], child)
        elif key in out:
            raise ValueError(f"merge_trees: {key!r} is in both trees")
        else:
            out[key] = child
    return out


def learning_rate_schedule(config: Mapping, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine to `lr * end_factor` or constant."""
    lr = float(config["lr"])
    warmup = int(config.get("warmup_steps", -1))
    if warmup < 0:
        warmup = int(round(float(config.get("warmup_ratio", 0.0)) * total_steps))
    warmup = min(warmup, total_steps)
    kind = config.get("schedule", "cosine")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(
            lr, max(total_steps - warmup, 1), alpha=float(config.get("end_factor", 0.0)))
    else:
        raise ConfigError(f"optim.schedule={kind!r}: expected 'cosine' or 'constant'")
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), after], boundaries=[warmup])


def _decay_mask(params):
    # No weight decay on vectors (norm scales, biases), as is usual for transformers.
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(config: Mapping, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if float(config.get("grad_clip", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(config["grad_clip"])))
    parts.append(optax.adamw(
        schedule, b1=float(config.get("b1", 0.9)), b2=float(config.get("b2", 0.999)),
        eps=float(config.get("eps", 1e-8)), weight_decay=float(config.get("weight_decay", 0.0)),
        mask=_decay_mask))
    return optax.chain(*parts), schedule
