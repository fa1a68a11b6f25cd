"""The PPO loop: iterations with checkpoints, SIGTERM resume, metrics, rollout samples, held-out
evaluation and the best checkpoint kept beside the latest.

A checkpoint's step is the ITERATION (the train state's own step counts optimizer updates:
iterations x steps_per_iteration). Prompts come from an index-based source (`batch(iteration)`),
so resuming at iteration k is a seek. Layout of the stage directory:

    checkpoints/<iteration>/   latest (orbax, last `keep`), on SIGTERM too (hosts agree)
    best/<iteration>/          the best by `eval_key` so far (one kept), with best.json
    rollouts/<iteration>.json  every `sample_every` iterations: prompt, response, reward
    metrics.jsonl, tensorboard/
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from rlaif_jax.checkpoints.orbax_io import Checkpoints
from rlaif_jax.engine.loop import Preempted, TrainingDiverged
from rlaif_jax.engine.metrics import MetricsWriter
from rlaif_jax.ppo.trainer import PPOTrainer
from rlaif_jax.engine.preemption import PreemptionWatch
from rlaif_jax.engine.state import TrainState


@dataclasses.dataclass
class PPOLoopOptions:
    num_iterations: int
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    async_checkpoints: bool = False
    eval_every: int = 10  # 0: only at the end
    sample_every: int = 10  # rollout samples to rollouts/<iteration>.json; 0: never
    samples: int = 8  # rollouts written each time
    eval_key: str = "eval/score"  # higher is better
    tensorboard: bool = True
    progress: bool = True
    seed: int = 0
    name: str = "ppo"  # the run's name in logs and metrics (ppo, ppo_oracle)


def write_rollout_samples(path: str, rollout: dict, count: int,
                          decode: Optional[Callable[[np.ndarray], str]]):
    """The first `count` rollouts as {prompt, response, score, reward} (text when `decode`)."""
    host = jax.device_get({k: rollout[k] for k in ("prompt_ids", "prompt_mask", "response",
                                                    "mask", "score", "sequence_reward")})
    records = []
    for row in range(min(count, len(host["response"]))):
        prompt = host["prompt_ids"][row][host["prompt_mask"][row].astype(bool)]
        response = host["response"][row][host["mask"][row].astype(bool)]
        text = (lambda ids: decode(ids)) if decode else (lambda ids: [int(i) for i in ids])
        records.append({"prompt": text(prompt), "response": text(response),
                        "score": float(host["score"][row]),
                        "reward": float(host["sequence_reward"][row])})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


def run_ppo(trainer: PPOTrainer, fresh_state: Callable[[], tuple[TrainState, Any]], prompts: Any,
            stage_dir: str, options: PPOLoopOptions,
            evaluate: Optional[Callable[[TrainState, Any], dict]] = None,
            decode: Optional[Callable[[np.ndarray], str]] = None, meta: Optional[dict] = None,
            on_iteration: Optional[Callable[[int], None]] = None) -> dict:
    """Runs PPO to `options.num_iterations` in `stage_dir`, resuming from its latest checkpoint.
    Returns the last iteration's metrics and the final evaluation."""
    primary = jax.process_index() == 0
    layout = trainer.layout
    checkpoints = Checkpoints(os.path.join(stage_dir, "checkpoints"), options.checkpoint_every,
                              options.keep_checkpoints, options.async_checkpoints)
    best = Checkpoints(os.path.join(stage_dir, "best"), 1, 1, False)
    best_file = os.path.join(stage_dir, "best.json")
    best_value = -math.inf
    if os.path.isfile(best_file):
        with open(best_file) as f:
            best_value = float(json.load(f)["value"])
    state, frozen = fresh_state()
    start = checkpoints.latest_step() or 0
    if start:
        state, stored = checkpoints.restore(start, layout.abstract_state_sharded)
        if int(stored.get("iteration", -1)) != start:
            raise RuntimeError(f"checkpoint {start} is inconsistent: {stored}")
        if primary:
            print(f"[{options.name}] resuming at iteration {start}", flush=True)
    writer = MetricsWriter(stage_dir, options.name, enabled=primary,
                           tensorboard=options.tensorboard)
    watch = PreemptionWatch()
    bar = tqdm(total=options.num_iterations, initial=start, desc=options.name, unit="iter",
               disable=not (primary and options.progress), dynamic_ncols=True)
    base_meta = dict(meta or {})

    def save(manager, iteration, force=False):
        return manager.save(iteration, state, dict(base_meta, stage="ppo", iteration=iteration,
                                                   data_position=iteration), force=force)

    def run_eval(iteration):
        nonlocal best_value
        if evaluate is None:
            return {}
        values = {k: float(v) for k, v in evaluate(state, frozen).items()}
        writer.write(iteration, values)
        if primary:
            print(f"[{options.name}] iteration {iteration}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in sorted(values.items())), flush=True)
        value = values.get(options.eval_key)
        if value is not None and math.isfinite(value) and value > best_value:
            best_value = value
            save(best, iteration, force=True)
            best.wait()
            if primary:
                with open(best_file, "w") as f:
                    json.dump({"iteration": iteration, "key": options.eval_key, "value": value}, f)
        return values

    last: dict = {}
    try:
        for iteration in range(start, options.num_iterations):
            local = prompts.batch(iteration, jax.process_index(), jax.process_count())
            rng = jax.random.fold_in(jax.random.PRNGKey(options.seed), iteration)
            state, metrics, rollout = trainer.iteration(
                state, frozen, local, rng, rng_seed=options.seed * 1_000_003 + iteration)
            done = iteration + 1
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                raise TrainingDiverged(
                    f"{options.name}: {', '.join(bad)} not finite at iteration {done}; "
                    f"stopping (last checkpoint: {checkpoints.latest_step()})")
            metrics["train/optimizer_step"] = float(jax.device_get(state.step))
            writer.write(done, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(score=f"{metrics['rollout/score_mean']:.3f}",
                            kl=f"{metrics['rollout/kl']:.3f}", refresh=False)
            if options.sample_every and done % options.sample_every == 0 and primary:
                write_rollout_samples(os.path.join(stage_dir, "rollouts", f"{done}.json"),
                                      rollout, options.samples, decode)
            save(checkpoints, done)
            if options.eval_every and done % options.eval_every == 0 and done < options.num_iterations:
                run_eval(done)
            if on_iteration is not None:
                on_iteration(done)
            if watch.should_stop():
                if checkpoints.latest_step() != done:
                    save(checkpoints, done, force=True)
                checkpoints.wait()
                raise Preempted(done)
        final = options.num_iterations
        if checkpoints.latest_step() != final:
            save(checkpoints, final, force=True)
        checkpoints.wait()
        results = dict(last)
        results.update(run_eval(final))
        return results
    finally:
        bar.close()
        watch.close()
        writer.close()
        checkpoints.close()
        best.close()
