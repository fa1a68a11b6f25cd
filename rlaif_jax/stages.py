"""One registry of the stages: every stage runs the same way, `run(config, mesh) -> metrics`.

`config.stage` names the stage (configs/<stage>.py set it); `run_stage(config)` starts the
multi-process runtime once, builds the device mesh of `config.mesh` and runs it. The inference
and eval stages answer on one process's devices with a mesh of their own; the feedback stage
splits its prompts across processes, each on its own devices.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

from rlaif_jax.eval import run as eval_run
from rlaif_jax.feedback import stage as feedback_stage
from rlaif_jax.inference import stage as inference_stage
from rlaif_jax.parallel.mesh import ConfigError, initialize_distributed, make_mesh
from rlaif_jax.ppo import stage as ppo_stage
from rlaif_jax.rm import stage as rm_stage
from rlaif_jax.sft import stage as sft_stage

STAGES: dict[str, Callable] = {
    "sft": sft_stage.run,
    "policy_init": sft_stage.run,  # SFT again, on the RL split, from the SFT checkpoint
    "feedback": feedback_stage.run,
    "rm": rm_stage.run,
    "ppo": ppo_stage.run,  # PPO alone; configs/ppo.py runs it as the main job (main_job.py)
    "generate": inference_stage.run,
    "eval": eval_run.run,
}
SINGLE_PROCESS = ("generate", "eval")  # no multi-process runtime, no global mesh


def runtime_mesh(config):
    """The multi-process runtime (started once: the main job runs stages in one process) and
    the global device mesh of `config.mesh`."""
    if not jax.distributed.is_initialized():
        initialize_distributed(config.distributed)
    return make_mesh(config.mesh)


def run_stage(config, mesh: Optional[object] = None) -> dict:
    run = STAGES.get(config.stage)
    if run is None:
        raise ConfigError(f"stage={config.stage!r}: expected one of {sorted(STAGES)}")
    if mesh is None and config.stage not in SINGLE_PROCESS:
        mesh = runtime_mesh(config)
    return run(config, mesh)
