"""Facts about a run directory (the workdir), in one place.

    WORKDIR/<stage>/checkpoints/<step>/   orbax step directories of a training stage
    WORKDIR/<stage>/config.json           the resolved config the stage ran with
    WORKDIR/<stage>/metrics.jsonl         one object a line
    WORKDIR/feedback/preferences.json     the feedback stage's output
    WORKDIR/data/world/                   the bundled synthetic world (made by the SFT stage)
    WORKDIR/eval/<row>/results.json       the main job's held-out table

A config names an earlier stage of the same workdir as `stage:NAME`.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from rlaif_jax.checkpoints.orbax_io import read_meta, resolve_checkpoint, saved_steps
from rlaif_jax.workdir.files import atomic_write_json

STAGE_PREFIX = "stage:"
PPO_STAGE = "ppo"  # the `stage` a PPO checkpoint's meta names
WORLD = os.path.join("data", "world")


def resolve_init(workdir: str, init: str) -> str:
    """`stage:NAME` -> WORKDIR/NAME; anything else as given ('' stays '')."""
    if init.startswith(STAGE_PREFIX):
        return os.path.join(os.path.abspath(workdir), init[len(STAGE_PREFIX):])
    return os.path.expanduser(init)


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(os.path.abspath(workdir), stage)


def world_dir(workdir: str, world: str = "") -> str:
    """The synthetic world a stage reads: `world` when given, else WORKDIR/data/world."""
    return os.path.abspath(world) if world else os.path.join(os.path.abspath(workdir), WORLD)


def workdir_of(step_dir: str) -> str:
    """The workdir a step directory sits in (WORKDIR/<stage>/checkpoints/<step>), wherever the
    workdir has moved since it was written."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))))


def latest_step(directory: str) -> Optional[int]:
    """The newest saved step of a stage directory (or of its checkpoints/ directory)."""
    checkpoints = os.path.join(directory, "checkpoints")
    steps = saved_steps(checkpoints if os.path.isdir(checkpoints) else directory)
    return steps[-1] if steps else None


def stage_done(workdir: str, stage: str) -> bool:
    """Whether WORKDIR/<stage> holds a finished output (a checkpoint, or the feedback file)."""
    directory = stage_dir(workdir, stage)
    if stage == "feedback":
        return os.path.isfile(os.path.join(directory, "preferences.json"))
    return latest_step(directory) is not None


def write_config(directory: str, config) -> None:
    """WORKDIR/<stage>/config.json: the resolved config (an ml_collections ConfigDict)."""
    atomic_write_json(os.path.join(directory, "config.json"),
                      json.loads(config.to_json_best_effort()))


def model_meta(step_dir: str) -> dict:
    """The meta of the checkpoint whose stage built the model of `step_dir`: a PPO checkpoint's
    model is its policy init's (PPO trains that model's adapter), followed down the lineage."""
    meta = read_meta(step_dir)
    if meta.get("stage") == PPO_STAGE:
        return model_meta(resolve_checkpoint(meta["init"])[1])
    return meta
