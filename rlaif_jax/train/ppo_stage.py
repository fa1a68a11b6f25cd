"""The PPO stage from a config, and the main job's chain of earlier stages.

`python launch/main.py --config=configs/ppo.py` runs, in order, every stage whose output is
missing from the workdir (each announced), then PPO. A stage that has its output is not redone;
a stage that stopped midway resumes from its own checkpoints, since each runs through its own
loop. A stage this checkout does not have stops the job with one line naming it.
"""

from __future__ import annotations

import importlib
import os

from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.train import optim
from rlaif_jax.train.ppo import PPOSettings

# (stage, config module, preset for each ppo preset): what PPO needs, in the order it is made.
CHAIN = (
    ("sft", "configs.sft", {"tiny": "tiny", "smoke": "smoke"}),
    ("policy_init", "configs.sft", {"tiny": "policy_init_tiny", "smoke": "policy_init_smoke"}),
    ("feedback", "configs.feedback", {"tiny": "tiny", "smoke": "smoke"}),
    ("rm", "configs.rm", {"tiny": "tiny", "smoke": "smoke"}),
)


def settings_from_config(config, eos_token_id: int, pad_token_id: int,
                         question_mark_ids: tuple = ()) -> PPOSettings:
    fields = {k: v for k, v in config.ppo.to_dict().items() if k != "max_prompt_length"}
    return PPOSettings(eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       question_mark_ids=tuple(question_mark_ids), **fields)


def ppo_optimizer(config, settings: PPOSettings):
    """AdamW with one global clip; warmup and cosine counted in iterations (SPEC.md: 5 warmup
    iterations), converted to optimizer steps (epochs x minibatches an iteration)."""
    per_iteration = settings.steps_per_iteration
    values = config.optim.to_dict()
    values["warmup_steps"] = int(values.pop("warmup_iterations")) * per_iteration
    return optim.make_optimizer(values, int(config.num_iterations) * per_iteration)


def stage_done(workdir: str, stage: str) -> bool:
    """Whether WORKDIR/<stage> holds a finished output (a checkpoint, or the feedback file)."""
    directory = os.path.join(workdir, stage)
    if stage == "feedback":
        return os.path.isfile(os.path.join(directory, "preferences.json"))
    checkpoints = os.path.join(directory, "checkpoints")
    return os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))


def chain_preset(config) -> str:
    """Which preset of the earlier stages matches this PPO config (tiny or smoke)."""
    return "smoke" if int(config.num_iterations) <= 4 else "tiny"


def run_missing_stages(config, run_stage_config) -> list[str]:
    """Runs every stage of CHAIN whose output is missing, in order; returns the ones it ran.
    `run_stage_config(stage_config)` runs one stage (launch/main.py's `run`)."""
    workdir = os.path.abspath(config.workdir)
    ran = []
    for stage, module_name, presets in CHAIN:
        if stage_done(workdir, stage):
            continue
        preset = presets[chain_preset(config)]
        try:
            module = importlib.import_module(module_name)
            stage_config = module.get_config(preset)
        except (ImportError, ValueError) as e:
            raise ConfigError(
                f"the main job needs stage {stage!r} ({module_name.replace('.', '/')}.py:"
                f"{preset}), which this checkout cannot run ({e}); run it or set "
                f"--config.init / --config.rm_init to existing checkpoints") from None
        with stage_config.unlocked():
            stage_config.workdir = workdir
            stage_config.seed = config.seed
        print(f"[main] {os.path.join(workdir, stage)} has no output: running stage {stage} "
              f"first ({module_name.replace('.', '/')}.py:{preset})", flush=True)
        run_stage_config(stage_config)
        ran.append(stage)
    return ran


def run_ppo_main(config, mesh, run_stage_config) -> int:
    """The main job: the missing earlier stages, then PPO, then the held-out table."""
    if config.run_missing_stages:
        run_missing_stages(config, run_stage_config)
    raise ConfigError(
        "stage 'ppo': loading the policy-init and reward-model checkpoints into the PPO tree is "
        "not wired in this checkout yet (it waits for the SFT stage on the synthetic world and "
        "the reward model stage); the PPO iteration and loop are in rlaif_jax/train/ppo.py and "
        "ppo_loop.py")
