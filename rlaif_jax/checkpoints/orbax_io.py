"""Orbax checkpoints of a train state: periodic, on preemption, keep the last K, exact resume.

A step directory `checkpoints/<step>/` holds two items: `state` (trainable params, optimizer
state, step, RNG; sharded arrays written by every host in parallel) and `meta` (JSON: the stage,
the data position, the frozen base the params sit on, and the config). Restoring into the
abstract state of the current layout puts every array straight onto its shards.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlaif_jax.checkpoints.safetensors_io import CheckpointError

STATE_ITEM, META_ITEM = "state", "meta"


def state_to_tree(state) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng}


def tree_to_state(tree: dict, like):
    return like.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                        rng=tree["rng"])


class Checkpoints:
    """A CheckpointManager over `directory` that saves every `every` steps and keeps `keep`."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=int(keep) if keep > 0 else None,
            create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE_ITEM, META_ITEM), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); every host must call it."""
        return self.manager.save(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state_to_tree(state)),
            META_ITEM: ocp.args.JsonSave(meta)}), force=force)

    def restore(self, step: int, abstract_state_sharded) -> tuple[Any, dict]:
        """(state placed on the abstract state's shardings, meta) of `step`."""
        target = state_to_tree(abstract_state_sharded)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target), META_ITEM: ocp.args.JsonRestore()}))
        return tree_to_state(restored[STATE_ITEM], abstract_state_sharded), dict(restored[META_ITEM])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def saved_steps(directory: str) -> list[int]:
    """The steps of a checkpoints/ directory that hold a finished state, oldest first (orbax
    writes a step under a temporary name and renames it when complete)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d, STATE_ITEM)))


def read_meta(step_dir: str) -> dict:
    """The JSON meta of a step directory (stage, init, seed, config)."""
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.path.join(step_dir, META_ITEM)))


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """Classifies an init path: ('hf', dir) for a Hugging Face directory, ('step', step_dir)
    for a stage directory (its latest checkpoint), a checkpoints/ directory or a step directory.
    Raises CheckpointError with one clear line when nothing usable is there."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"init checkpoint {path} does not exist")
    if os.path.isdir(os.path.join(path, STATE_ITEM)):
        return "step", path
    # Before the HF check: a stage directory also holds a config.json (the resolved config).
    for directory in (os.path.join(path, "checkpoints"), path):
        steps = saved_steps(directory)
        if steps:
            return "step", os.path.join(directory, str(steps[-1]))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"stage directory {path} holds no checkpoint yet (checkpoints/ has "
                              "no <step>/state)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    raise CheckpointError(
        f"init checkpoint {path}: neither a Hugging Face directory (config.json) nor a stage, "
        "checkpoints/ or step directory holding an orbax checkpoint")


def read_step_dir(step_dir: str) -> tuple[dict, dict]:
    """(params, meta) of a step directory, as host numpy arrays (for initialising a new stage
    from an earlier one; the optimizer state is not read back)."""
    checkpointer = ocp.PyTreeCheckpointer()
    item = os.path.join(step_dir, STATE_ITEM)
    metadata = checkpointer.metadata(item)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
        item=tree, restore_args=restore_args))
    return restored["params"], read_meta(step_dir)
