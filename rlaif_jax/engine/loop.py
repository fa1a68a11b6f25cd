"""The one training loop every stage shares (SFT, policy init, RM, PPO): it owns the I/O, the
stage's step owns none.

A `Stage` bundles how to advance the train state one step, an index-based data source
(`batch(step)` returns this process's rows of the global batch for `step`, so resuming is a
seek), how to build the starting state, and an optional evaluation. The
loop resumes from the latest checkpoint, writes metrics, shows progress, stops on NaN/Inf naming
the step, saves periodically and on SIGTERM (all hosts agreeing on the step), evaluates every
`eval_every` steps and at the end, and, with `best_key`, keeps the best checkpoint by that
evaluation beside the latest. Layout of the stage directory:

    checkpoints/<step>/   the latest (orbax, the last `keep`), on SIGTERM too
    best/<step>/          with best_key: the best evaluation so far (one kept), and best.json
    metrics.jsonl, tensorboard/

A supervised stage gives a jitted `train_step(state, frozen, global batch)`; PPO replaces the
whole step with `advance` (sampling, scoring and minibatch updates of one iteration).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from rlaif_jax.checkpoints.orbax_io import Checkpoints
from rlaif_jax.engine.metrics import MetricsWriter
from rlaif_jax.engine.preemption import PreemptionWatch
from rlaif_jax.engine.state import StateLayout, TrainState
from rlaif_jax.parallel.sharding import global_batch
from rlaif_jax.workdir.files import atomic_write_json, read_json
from rlaif_jax.workdir.layout import write_config


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
    name: str  # in logs, metrics and checkpoint metas
    layout: StateLayout
    data: Any  # .batch(step) -> this process's rows of the step's batch (numpy arrays)
    num_steps: int
    fresh_state: Callable[[], tuple[TrainState, Any]]  # (state at step 0, frozen variables)
    # (state, frozen, global batch) -> (state, metrics without a namespace, e.g. 'loss')
    train_step: Optional[Callable] = None
    # (state, frozen, this process's rows, step) -> (state, namespaced host metrics): a step
    # that is more than one jitted call (PPO's iteration); replaces train_step.
    advance: Optional[Callable] = None
    evaluate: Optional[Callable[[TrainState, Any], dict]] = None  # -> {'eval/...': float}
    meta: dict = dataclasses.field(default_factory=dict)  # stored with every checkpoint
    unit: str = "step"  # what a step is called in logs, metas and best.json ('iteration')
    best_key: str = ""  # keep best/<step> by this evaluation (higher is better); '' = no
    progress_keys: tuple = (("loss", "train/loss"),)  # (label, metric) on the progress bar
    count_tokens: bool = True  # train/tokens_per_second from the batches' attention masks


@dataclasses.dataclass
class LoopOptions:
    """How the loop saves, logs and evaluates; stages build it from their config
    (`from_config`: the `checkpoint` and `log` sections, configs/common.py's defaults)."""

    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoints: bool
    log_every: int  # metrics are fetched from the device every N steps (no sync between)
    eval_every: int  # 0: only at the end; < 0: never
    tensorboard: bool
    progress: bool

    @classmethod
    def from_config(cls, config) -> "LoopOptions":
        """From a stage config's `checkpoint` and `log` sections."""
        return cls(checkpoint_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
                   async_checkpoints=config.checkpoint.async_save, log_every=config.log.every,
                   eval_every=config.log.eval_every, tensorboard=config.log.tensorboard,
                   progress=config.log.progress)


class _BestCheckpoint:
    """best/<step>/ and best.json: the checkpoint with the highest `key` so far."""

    def __init__(self, stage_dir: str, key: str, unit: str):
        self.key, self.unit = key, unit
        self.manager = Checkpoints(os.path.join(stage_dir, "best"), 1, 1, False)
        self.path = os.path.join(stage_dir, "best.json")
        stored = read_json(self.path) if os.path.isfile(self.path) else None
        self.value = float(stored["value"]) if stored else -math.inf

    def offer(self, step: int, values: dict, save: Callable) -> None:
        value = values.get(self.key)
        if value is None or not math.isfinite(value) or value <= self.value:
            return
        self.value = value
        save(self.manager, step, force=True)
        self.manager.wait()
        if jax.process_index() == 0:
            atomic_write_json(self.path, {self.unit: step, "key": self.key, "value": value})

    def close(self):
        self.manager.close()


def run_stage(stage: Stage, stage_dir: str, options: LoopOptions) -> dict:
    """Trains `stage` to `num_steps` in `stage_dir`; returns the last train and eval metrics."""
    if (stage.train_step is None) == (stage.advance is None):
        raise ValueError(f"{stage.name}: give exactly one of train_step and advance")
    primary = jax.process_index() == 0
    checkpoints = Checkpoints(os.path.join(stage_dir, "checkpoints"), options.checkpoint_every,
                              options.keep_checkpoints, options.async_checkpoints)
    best = _BestCheckpoint(stage_dir, stage.best_key, stage.unit) if stage.best_key else None
    state, frozen = stage.fresh_state()
    start = checkpoints.latest_step() or 0
    if start:
        state, meta = checkpoints.restore(start, stage.layout.abstract_state_sharded)
        if int(meta.get("data_position", -1)) != start:
            raise RuntimeError(f"checkpoint {start} is inconsistent: {meta}")
        logging.info("resuming %s at %s %d", stage.name, stage.unit, start)
        if primary:
            print(f"[{stage.name}] resuming at {stage.unit} {start}", flush=True)
    writer = MetricsWriter(stage_dir, stage.name, enabled=primary, tensorboard=options.tensorboard)
    watch = PreemptionWatch()
    bar = tqdm(total=stage.num_steps, initial=start, desc=stage.name, unit=stage.unit[:4],
               disable=not (primary and options.progress), dynamic_ncols=True, smoothing=0.1)
    pending: list[tuple[int, Any]] = []
    window = {"time": time.time(), "tokens": 0.0}
    last: dict = {}

    def flush():
        """Fetches the pending steps' metrics (one device sync), checks and writes them."""
        nonlocal last
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        rate = window["tokens"] / max(time.time() - window["time"], 1e-9)
        for (step, _), values in zip(pending, fetched):
            bad = [k for k, v in values.items() if not math.isfinite(float(v))]
            if bad:
                raise TrainingDiverged(
                    f"{stage.name}: {', '.join(f'{k}={float(values[k])}' for k in bad)} at "
                    f"{stage.unit} {step}; stopping (last checkpoint: "
                    f"{checkpoints.latest_step()})")
            record = {(k if "/" in k else f"train/{k}"): float(v) for k, v in values.items()}
            if stage.count_tokens:
                record["train/tokens_per_second"] = rate
            writer.write(step, record)
            last = record
        bar.set_postfix({label: f"{last[key]:.4f}" for label, key in stage.progress_keys
                         if key in last}, refresh=False)
        pending.clear()
        window.update(time=time.time(), tokens=0.0)

    def save(manager, step, force=False):
        meta = dict(stage.meta, data_position=step, **{stage.unit: step})
        meta.setdefault("stage", stage.name)
        return manager.save(step, state, meta, force=force)

    def evaluate(step):
        if stage.evaluate is None or options.eval_every < 0:
            return {}
        values = {k: float(v) for k, v in stage.evaluate(state, frozen).items()}
        writer.write(step, values)
        if primary:
            print(f"[{stage.name}] {stage.unit} {step}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in sorted(values.items())), flush=True)
        if best is not None:
            best.offer(step, values, save)
        return values

    results: dict = {}
    try:
        for step in range(start, stage.num_steps):
            local = stage.data.batch(step)  # this process's rows
            if stage.count_tokens:
                window["tokens"] += float(np.sum(local["attention_mask"])) * jax.process_count()
            if stage.advance is not None:
                state, metrics = stage.advance(state, frozen, local, step)
            else:
                state, metrics = stage.train_step(state, frozen,
                                                  global_batch(local, stage.layout.mesh))
            done = step + 1
            pending.append((done, metrics))
            bar.update(1)
            if done % options.log_every == 0:
                flush()
            if done % options.checkpoint_every == 0:
                flush()  # never save a state whose loss was not finite
                save(checkpoints, done)
            if options.eval_every > 0 and done % options.eval_every == 0 and done < stage.num_steps:
                results.update(evaluate(done))
            if watch.should_stop():
                flush()
                if checkpoints.latest_step() != done:
                    save(checkpoints, done, force=True)
                checkpoints.wait()
                raise Preempted(done)
        flush()
        final = stage.num_steps
        if checkpoints.latest_step() != final:
            save(checkpoints, final, force=True)
        checkpoints.wait()
        results.update(evaluate(final))
        results.update(last)
        return results
    finally:
        bar.close()
        watch.close()
        writer.close()
        checkpoints.close()
        if best is not None:
            best.close()


def train(stage: Stage, stage_dir: str, config) -> dict:
    """Runs a stage built from `config` with the loop options of its `checkpoint` and `log`
    sections, recording the resolved config in stage_dir/config.json."""
    mesh = stage.layout.mesh
    if jax.process_index() == 0:
        write_config(stage_dir, config)
        print(f"[{stage.name}] mesh {dict(mesh.shape)} on {jax.device_count()} devices, "
              f"{jax.process_count()} process(es); workdir {stage_dir}", flush=True)
    results = run_stage(stage, stage_dir, LoopOptions.from_config(config))
    if jax.process_index() == 0:
        print(f"[{stage.name}] done: " + json.dumps(
            {k: round(v, 5) for k, v in sorted(results.items())}), flush=True)
    return results
