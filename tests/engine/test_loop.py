"""The generic loop with a scripted step: NaN guard, metrics file, preemption, resume."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.parallel.sharding import DEFAULT_RULES
from rlaif_jax.engine import state as state_lib
from rlaif_jax.engine.loop import LoopOptions, Preempted, Stage, TrainingDiverged, run_stage


class Rows:
    def batch(self, step, process_index=0, process_count=1):
        return {"attention_mask": np.ones((2, 3), np.int32), "step": np.full((2,), step)}


def _stage(losses, on_step=None, num_steps=8):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    init = lambda rng: {"params": {"w": jnp.zeros((3,))}}
    layout = state_lib.plan_state(init, optax.sgd(0.1), mesh, DEFAULT_RULES, "params/.*")

    def step(state, frozen, batch):
        index = int(state.step)
        if on_step:
            on_step(index)
        params = jax.tree.map(lambda w: w + 1.0, state.params)
        return state.replace(step=state.step + 1, params=params), {
            "loss": jnp.float32(losses[index]), "weight": jnp.float32(6)}

    return Stage(name="sft", layout=layout, train_step=step, data=Rows(), num_steps=num_steps,
                 fresh_state=lambda: state_lib.init_state(layout, init, jax.random.PRNGKey(0)),
                 evaluate=lambda state, frozen: {"eval/w": float(state.params["params"]["w"][0])})


OPTIONS = LoopOptions(checkpoint_every=4, keep_checkpoints=2, async_checkpoints=False,
                      log_every=3, eval_every=0, tensorboard=False, progress=False)


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    losses = [1.0, 0.9, 0.8, 0.7, 0.6, float("nan"), 0.5, 0.4]
    with pytest.raises(TrainingDiverged, match=r"loss=nan at step 6; .*last checkpoint: 4"):
        run_stage(_stage(losses), str(tmp_path), OPTIONS)
    assert os.listdir(tmp_path / "checkpoints") == ["4"]


def test_metrics_file_checkpoints_and_resume(tmp_path):
    losses = [1.0 - 0.1 * i for i in range(8)]
    seen = []
    result = run_stage(_stage(losses, seen.append), str(tmp_path), OPTIONS)
    assert seen == list(range(8)) and result["eval/w"] == 8.0
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(r["stage"] == "sft" and "train/tokens_per_second" in r for r in records[:-1])
    assert records[-1] == {**records[-1], "step": 8, "eval/w": 8.0}
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["4", "8"]
    # Done already: a rerun restores step 8, trains nothing, evaluates the restored params.
    seen.clear()
    assert run_stage(_stage(losses, seen.append), str(tmp_path), OPTIONS)["eval/w"] == 8.0
    assert seen == []


def test_sigterm_saves_at_the_agreed_step_and_resumes_there(tmp_path):
    losses = [1.0] * 8
    kill = lambda index: index == 2 and os.kill(os.getpid(), signal.SIGTERM)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        run_stage(_stage(losses, kill), str(tmp_path), OPTIONS)
    assert stopped.value.step == 3 and os.listdir(tmp_path / "checkpoints") == ["3"]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the loop's handler is removed
    seen = []
    result = run_stage(_stage(losses, seen.append), str(tmp_path), OPTIONS)
    assert seen == [3, 4, 5, 6, 7] and result["eval/w"] == 8.0
