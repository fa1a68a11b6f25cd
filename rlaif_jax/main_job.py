"""The main job: `python launch/main.py --config=configs/ppo.py`.

It runs, in order, every earlier stage whose output is missing from the workdir (each announced),
then PPO on the reward model (WORKDIR/ppo), then the control (PPO on the synthetic world's true
reward: WORKDIR/ppo_oracle), then the held-out table. A stage that has its output is not redone;
a stage that stopped midway resumes from its own checkpoints; a table row already computed from
the same checkpoint is read back. The earlier stages' configs come from the caller
(`chain_config(stage)`, launch/main.py reads them from the config files): the library never
reads configs/.

The table's rows, all the policy model answering the world's held-out questions greedily, graded
by the world's scorer (`rlaif_jax/eval/synthetic_qa.py`, the SFT stage's evaluation):
  sft          the SFT model (the policy's frozen base, no adapter)
  policy_init  the base with the initial policy adapter (PPO's starting point and reference)
  ppo          RLAIF: PPO on the reward model (WORKDIR/ppo, last iteration)
  ppo_oracle   the control: PPO on the true reward (WORKDIR/ppo_oracle, last iteration)
  blind        the SFT model with every video swapped for another (what the text alone gives)
Each row is written to WORKDIR/eval/<row>/results.json (the eval harness's format, which
`python -m rlaif_jax.report` reads) with the checkpoint it came from.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from rlaif_jax.engine.metrics import read_metrics
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.ppo.stage import REWARDS, PPORun, run_ppo
from rlaif_jax.stages import run_stage
from rlaif_jax.workdir.files import atomic_write_json, atomic_write_text, read_json
from rlaif_jax.workdir.layout import latest_step, stage_done

# What PPO needs, in the order it is made; then, with config.rm_controls, the context ablation:
# RMs on the same pairs labelled by the judge without context and by the truth.
CHAIN = ("sft", "policy_init", "feedback", "rm")
RM_CONTROLS = ("rm_no_context", "rm_oracle")
RM_COLUMNS = (("vs truth", "eval/rm_accuracy_truth"),
              ("vs truth, decisive", "eval/rm_accuracy_truth_decisive"),
              ("vs the AI judge's labels", "eval/rm_accuracy_ai"),
              ("held-out pairs", "eval/heldout_pairs"))


class StageClock:
    """Wall seconds of each part of the main job: printed as each part ends and kept in
    WORKDIR/eval/stage_times.json (a resumed job adds its seconds to what is there)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "eval", "stage_times.json")
        self.seconds = read_json(self.path) if os.path.isfile(self.path) else {}

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.seconds[name] = round(self.seconds.get(name, 0.0) + took, 1)
        if jax.process_index() == 0:
            atomic_write_json(self.path, self.seconds)
        print(f"[main] {name} took {took:.0f} s", flush=True)


def run_missing_stages(config, chain_config: Optional[Callable[[str], ml_collections.ConfigDict]],
                       clock: Optional[StageClock] = None) -> list[str]:
    """Runs every stage of CHAIN whose output is missing, in order; returns the ones it ran.
    `chain_config(stage)` gives that stage's config for this job (workdir and seed set)."""
    workdir = os.path.abspath(config.workdir)
    ran = []
    for stage in CHAIN + (RM_CONTROLS if config.rm_controls else ()):
        directory = os.path.join(workdir, stage)
        if stage == "rm_no_context" and _judge_context(workdir) == "none":
            print("[main] the judge read no context: its labels without context are the RM's "
                  "own; not training rm_no_context", flush=True)
            continue
        if stage_done(workdir, stage):
            print(f"[main] {directory} is done: not redoing stage {stage}", flush=True)
            continue
        if chain_config is None:
            raise ConfigError(f"the main job needs stage {stage!r}, which has no output in "
                              f"{directory}; run it first, or set --config.init / "
                              "--config.rm_init to existing checkpoints")
        stage_config = chain_config(stage)
        print(f"[main] {directory} has no output: running stage {stage} first", flush=True)
        with clock.part(stage) if clock else contextlib.nullcontext():
            run_stage(stage_config)
        ran.append(stage)
    return ran


def _judge_context(workdir: str) -> Optional[str]:
    """The context the feedback stage of `workdir` gave its judge (None if unknown)."""
    path = os.path.join(workdir, "feedback", "config.json")
    return read_json(path).get("context") if os.path.isfile(path) else None


def run(config, mesh, chain_config=None) -> dict:
    """The main job: the missing earlier stages, PPO, the control, then the held-out table.
    Returns the table's rows by name."""
    if config.reward not in REWARDS:  # before hours of earlier stages
        raise ConfigError(f"reward={config.reward!r}: expected one of {sorted(REWARDS)}")
    if config.compilation_cache:
        use_compilation_cache(os.path.abspath(config.workdir))
    clock = StageClock(os.path.abspath(config.workdir))
    if config.run_missing_stages:
        run_missing_stages(config, chain_config, clock)
    with clock.part(REWARDS[config.reward]):
        ppo_run, _ = run_ppo(config, mesh)
    rm_table(config)
    if not config.eval.controls:
        return {}
    if config.reward == "rm":
        oracle = ml_collections.ConfigDict(config.to_dict())
        oracle.reward = "truth"
        print("[main] control: PPO on the true reward (the world's scorer) -> "
              f"{os.path.join(os.path.abspath(config.workdir), REWARDS['truth'])}", flush=True)
        with clock.part(REWARDS["truth"]):
            run_ppo(oracle, mesh, ppo_run.loaded)
    with clock.part("eval"):
        rows = held_out_table(config, mesh, ppo_run)
    return {row["name"]: row["metrics"] for row in rows}


def use_compilation_cache(workdir: str) -> None:
    """Compiled programs kept on disk in WORKDIR/jax_cache. The chain compiles the same steps
    several times (three reward models, two PPO runs, one sampler per stage, a rerun after a
    crash); from the cache each is compiled once. Inside the workdir only: a fresh workdir
    starts cold."""
    if jax.config.jax_compilation_cache_dir:  # the user's own choice wins
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    # Our compiles on CPU take 0.2-10 s each; the default threshold of 1 s would skip most.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def rm_table(config) -> str:
    """The reward models side by side (last held-out evaluation of each), with the heuristic
    baselines on the same pairs; written to WORKDIR/eval/rm_table.md and printed."""
    workdir = os.path.abspath(config.workdir)
    rows, baselines = [], {}
    for stage in ("rm",) + RM_CONTROLS:
        path = os.path.join(workdir, stage, "metrics.jsonl")
        records = read_metrics(path, "eval/rm_accuracy_truth") if os.path.isfile(path) else []
        if not records:
            continue
        last = records[-1]
        rows.append(f"| {stage} | " + " | ".join(
            "-" if last.get(key) is None else f"{last[key]:.3f}" if "pairs" not in key
            else f"{int(last[key])}" for _, key in RM_COLUMNS) + " |")
        baselines = {k: v for k, v in last.items() if k.startswith("eval/baseline_")}
    if not rows:
        return ""
    text = ("| reward model | " + " | ".join(t for t, _ in RM_COLUMNS) + " |\n|---|"
            + "---|" * len(RM_COLUMNS) + "\n" + "\n".join(rows))
    if baselines:
        text += "\n\nheuristics on the same pairs, vs truth: " + ", ".join(
            f"{k[len('eval/baseline_'):-len('_accuracy_truth')]} {v:.3f}"
            for k, v in sorted(baselines.items()))
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(workdir, "eval", "rm_table.md"), text + "\n")
        print("[table] reward models on their held-out pairs:\n" + text, flush=True)
    return text


def results_row(name: str, metrics: dict, suffix: str = "") -> dict:
    """An eval row in the eval harness's results format (report.md's table reads it): QA
    accuracy (%) and score (0-5 scale, the scorer's [0, 1] x 5), benchmark axes 0-5 from the
    descriptions (detail) and the temporal questions."""
    def get(key):
        value = metrics.get(f"eval/{key}{suffix}")
        return None if value is None or not np.isfinite(value) else float(value)

    axes = {}
    for axis, key in (("correctness", "describe_correctness"), ("detail", "describe_detail"),
                      ("temporal", "temporal")):
        if get(key) is not None:
            axes[axis] = 5.0 * get(key)
    qa = {}
    if get("exact_match") is not None:
        qa = {"accuracy": 100.0 * get("exact_match"),
              "score": None if get("correctness") is None else 5.0 * get("correctness")}
    return {"name": name, "judge": "synthetic scorer", "axes": axes,
            "tasks": {"synthetic_qa": qa} if qa else {},
            "metrics": {k.replace(suffix, "") if suffix else k: v for k, v in metrics.items()
                        if (k.endswith(suffix) if suffix else not k.endswith("_blind"))}}


COLUMNS = (("QA exact match", "exact_match"), ("QA temporal", "temporal"),
           ("describe detail", "describe_detail"), ("describe temporal", "describe_temporal"),
           ("describe correctness", "describe_correctness"))


def _cached(path: str, source: str):
    if os.path.isfile(path):
        row = read_json(path)
        if row.get("source") == source:
            return row
    return None


def format_table(rows: list[dict], chance: float | None) -> str:
    lines = ["| model | " + " | ".join(t for t, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for _, key in COLUMNS:
            value = row["metrics"].get(f"eval/{key}")
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if chance is not None:
        lines.append(f"\nchance (uniform guess on the short questions): {chance:.3f}; scores "
                     "are the scorer's in [0, 1]")
    return "\n".join(lines)


def held_out_table(config, mesh, run=None) -> list[dict]:
    """The table's rows (computed, or read back); `run` an RLAIF PPORun to reuse its models."""
    workdir = os.path.abspath(config.workdir)
    eval_dir = os.path.join(workdir, "eval")
    wanted = [("sft", None), ("policy_init", None), ("ppo", REWARDS["rm"]),
              ("ppo_oracle", REWARDS["truth"])]
    loaded = {}

    def tree_of(stage):
        nonlocal run
        if run is None:
            run = PPORun(config, mesh)
        if "frozen" not in loaded:
            loaded["start"], loaded["frozen"] = run.fresh_state()
        state = loaded["start"]
        if stage is not None:
            state = run.restore(os.path.join(workdir, stage))
        return run.tree(state, loaded["frozen"])

    rows, chance = [], None
    policy_init = os.path.join(workdir, "policy_init")
    base_source = f"{policy_init}@{latest_step(policy_init)}"
    for name, stage in wanted:
        source = base_source
        if stage is not None:
            step = latest_step(os.path.join(workdir, stage))
            if step is None:
                print(f"[table] {name}: {os.path.join(workdir, stage)} has no checkpoint; row "
                      "left out", flush=True)
                continue
            source = f"{os.path.join(workdir, stage)}@{step}"
        path = os.path.join(eval_dir, name, "results.json")
        row = _cached(path, source)
        if row is None or (name == "sft" and _cached(
                os.path.join(eval_dir, "blind", "results.json"), source) is None):
            tree = tree_of(stage)
            models = run.loaded.models
            if name == "sft":  # the frozen base alone
                variables = {"params": tree["policy"]["params"]}
            elif name == "policy_init":
                variables = models.reference_variables(tree)
            else:
                variables = models.policy_variables(tree)
            metrics, shown = run.held_out()(variables, blind=(name == "sft"))
            row = dict(results_row(name, metrics), source=source, examples=shown)
            if jax.process_index() == 0:
                atomic_write_json(path, row)
                if name == "sft":  # the blind baseline: the SFT model, videos swapped
                    atomic_write_json(os.path.join(eval_dir, "blind", "results.json"),
                                      dict(results_row("blind", metrics, "_blind"),
                                           source=source))
        chance = row["metrics"].get("eval/chance", chance)
        rows.append(row)
    blind = _cached(os.path.join(eval_dir, "blind", "results.json"), base_source)
    if blind is not None:
        rows.append(blind)
    text = format_table(rows, chance)
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(eval_dir, "table.md"), text + "\n")
        print("[table] held-out questions of the synthetic world, graded by its scorer:\n" + text,
              flush=True)
    return rows
