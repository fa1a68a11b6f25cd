"""The training loop every stage shares: it owns the I/O, the stage's step owns none.

A `Stage` bundles a jitted step, an index-based data source (`batch(step, process_index,
process_count)` returns this process's rows of the global batch for `step`, so resuming is a
seek), how to build the starting state, and an optional evaluation. The loop resumes from the
latest checkpoint, writes metrics, shows progress, stops on NaN/Inf naming the step, saves
periodically and on SIGTERM (all hosts agreeing on the step) and evaluates at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from rlaif_jax.checkpoints.orbax_io import Checkpoints
from rlaif_jax.parallel.sharding import BATCH_AXES
from rlaif_jax.engine.metrics import MetricsWriter
from rlaif_jax.engine.preemption import PreemptionWatch
from rlaif_jax.engine.state import StateLayout, TrainState
from rlaif_jax.engine.step import ShardedFunction


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the message names the step."""


class Preempted(RuntimeError):
    """SIGTERM was received; a checkpoint of `step` was written."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step}; run the same command "
                         "again to resume")
        self.step = step


@dataclasses.dataclass
class Stage:
    name: str
    layout: StateLayout
    train_step: ShardedFunction
    data: Any  # .batch(step, process_index, process_count) -> dict of numpy arrays
    num_steps: int
    fresh_state: Callable[[], tuple[TrainState, Any]]  # (state at step 0, frozen variables)
    evaluate: Optional[Callable[[TrainState, Any], dict]] = None  # -> {'eval/...': float}
    meta: dict = dataclasses.field(default_factory=dict)  # stored with every checkpoint


@dataclasses.dataclass
class LoopOptions:
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    tensorboard: bool = True
    progress: bool = True


def global_batch(local: dict, mesh) -> dict:
    """This process's rows -> global jax.Arrays sharded over ('data', 'fsdp')."""
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def run_stage(stage: Stage, stage_dir: str, options: LoopOptions) -> dict:
    """Trains `stage` to `num_steps` in `stage_dir`; returns the last train and eval metrics."""
    primary = jax.process_index() == 0
    checkpoints = Checkpoints(os.path.join(stage_dir, "checkpoints"), options.checkpoint_every,
                              options.keep_checkpoints, options.async_checkpoints)
    state, frozen = stage.fresh_state()
    start = checkpoints.latest_step() or 0
    if start:
        state, meta = checkpoints.restore(start, stage.layout.abstract_state_sharded)
        if int(meta.get("data_position", start)) != start or int(state.step) != start:
            raise RuntimeError(f"checkpoint {start} is inconsistent: {meta}")
        logging.info("resuming %s at step %d", stage.name, start)
        if primary:
            print(f"[{stage.name}] resuming at step {start}", flush=True)
    writer = MetricsWriter(stage_dir, stage.name, enabled=primary, tensorboard=options.tensorboard)
    watch = PreemptionWatch()
    bar = tqdm(total=stage.num_steps, initial=start, desc=stage.name, unit="step",
               disable=not (primary and options.progress), dynamic_ncols=True, smoothing=0.1)
    pending: list[tuple[int, Any, float]] = []
    window = {"time": time.time(), "tokens": 0.0}
    last: dict = {}

    def flush():
        nonlocal last
        if not pending:
            return
        fetched = jax.device_get([m for _, m, _ in pending])
        elapsed = max(time.time() - window["time"], 1e-9)
        rate = window["tokens"] / elapsed
        for (step, _, _), values in zip(pending, fetched):
            bad = [k for k, v in values.items() if not math.isfinite(float(v))]
            if bad:
                raise TrainingDiverged(
                    f"{stage.name}: {', '.join(f'{k}={float(values[k])}' for k in bad)} at step "
                    f"{step}; stopping (last checkpoint: {checkpoints.latest_step()})")
            record = {f"train/{k}": float(v) for k, v in values.items()}
            record["train/tokens_per_second"] = rate
            writer.write(step, record)
            last = record
        bar.set_postfix(loss=f"{last['train/loss']:.4f}", refresh=False)
        pending.clear()
        window.update(time=time.time(), tokens=0.0)

    def save(step, force=False):
        meta = dict(stage.meta, stage=stage.name, data_position=step)
        return checkpoints.save(step, state, meta, force=force)

    def evaluate(step):
        if stage.evaluate is None:
            return {}
        values = {k: float(v) for k, v in stage.evaluate(state, frozen).items()}
        writer.write(step, values)
        if primary:
            print(f"[{stage.name}] step {step}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in sorted(values.items())), flush=True)
        return values

    results: dict = {}
    try:
        for step in range(start, stage.num_steps):
            local = stage.data.batch(step, jax.process_index(), jax.process_count())
            window["tokens"] += float(np.sum(local["attention_mask"])) * jax.process_count()
            state, metrics = stage.train_step(state, frozen, global_batch(local, stage.layout.mesh))
            done = step + 1
            pending.append((done, metrics, time.time()))
            bar.update(1)
            if done % options.log_every == 0:
                flush()
            if done % options.checkpoint_every == 0:
                flush()  # never save a state whose loss was not finite
                save(done)
            if options.eval_every and done % options.eval_every == 0 and done < stage.num_steps:
                results.update(evaluate(done))
            if watch.should_stop():
                flush()
                save(done, force=True)
                checkpoints.wait()
                raise Preempted(done)
        flush()
        final = stage.num_steps
        if checkpoints.latest_step() != final:
            save(final, force=True)
        checkpoints.wait()
        results.update(evaluate(final))
        results.update(last)
        return results
    finally:
        bar.close()
        watch.close()
        writer.close()
        checkpoints.close()
