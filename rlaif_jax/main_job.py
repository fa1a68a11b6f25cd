"""The main job's last step: SFT vs PPO on held-out questions, beside the controls.

Rows, all the policy model answering the world's held-out questions greedily, graded by the
world's scorer (`rlaif_jax/eval/synthetic_qa.py`, the SFT stage's evaluation):
  sft          the SFT model (the policy's frozen base, no adapter)
  policy_init  the base with the initial policy adapter (PPO's starting point and reference)
  ppo          RLAIF: PPO on the reward model (WORKDIR/ppo, last iteration)
  ppo_oracle   the control: PPO on the true reward (WORKDIR/ppo_oracle, last iteration)
  blind        the SFT model with every video swapped for another (what the text alone gives)
Each row is written to WORKDIR/eval/<row>/results.json (the eval harness's format, which
`python -m rlaif_jax.report` reads) with the checkpoint it came from; a rerun reads a row back
instead of recomputing it when that checkpoint is unchanged.
"""

from __future__ import annotations

import json
import os

import jax

from rlaif_jax.checkpoints.orbax_io import Checkpoints
from rlaif_jax.eval.store import atomic_write_json, atomic_write_text

COLUMNS = (("QA exact match", "exact_match"), ("QA temporal", "temporal"),
           ("describe detail", "describe_detail"), ("describe temporal", "describe_temporal"),
           ("describe correctness", "describe_correctness"))


def _latest(stage_dir: str):
    manager = Checkpoints(os.path.join(stage_dir, "checkpoints"), 1, 1, False)
    step = manager.latest_step()
    manager.close()
    return step


def _cached(path: str, source: str):
    if os.path.isfile(path):
        with open(path) as f:
            row = json.load(f)
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
    from rlaif_jax.ppo.stage import REWARDS, PPORun
    from rlaif_jax.ppo.prompts import results_row

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
            manager = Checkpoints(os.path.join(workdir, stage, "checkpoints"), 1, 1, False)
            state, _ = manager.restore(manager.latest_step(), run.layout.abstract_state_sharded)
            manager.close()
        return run.tree(state, loaded["frozen"])

    rows, chance = [], None
    policy_init = os.path.join(workdir, "policy_init")
    base_source = f"{policy_init}@{_latest(policy_init)}"
    for name, stage in wanted:
        source = base_source
        if stage is not None:
            step = _latest(os.path.join(workdir, stage))
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
