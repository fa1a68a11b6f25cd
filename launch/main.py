"""One entry point for every stage: `python launch/main.py --config=configs/sft.py[:preset]`.

Every process of a multi-host job runs the same command. The stage writes under
WORKDIR/<stage>/: checkpoints/<step>/, metrics.jsonl, tensorboard/, config.json.
A bad config or a missing checkpoint stops at start with one line on stderr and exit status 2;
a preempted run (SIGTERM) saves and exits 143; a diverged run (NaN/Inf) exits 1.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:preset]",
                                          lock_config=True)

EXIT_CONFIG, EXIT_DIVERGED, EXIT_PREEMPTED = 2, 1, 143


def fail(message: str, status: int = EXIT_CONFIG):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose failures are one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        name = e.flagname or ""
        if name.startswith("config."):
            fail(f"unknown config key {name[len('config.'):]!r} (from --{name})")
        fail(f"unknown flag --{name}")
    except (AttributeError, KeyError) as e:
        # ml_collections: an override of a key that the locked config does not have.
        message = str(e).replace("\\n", "\n")
        found = re.search(r"'([\w.-]+)'", message.replace("\\", ""))
        key = found.group(1) if found else message
        given = [a.split("=")[0][len("--config."):] for a in argv[1:] if a.startswith("--config.")]
        path = next((g for g in given if g.split(".")[-1] == key), key)
        hint = re.search(r'Did you mean "([^"]+)"', message)
        fail(f"unknown config key {path!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
    except Exception as e:  # noqa: BLE001 -- flag parsing errors come in many types
        text = "\n".join(str(x) for x in (e, e.__cause__) if x)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errno = [line for line in lines if line.startswith("[Errno")]
        if "Failed loading config file" in text and errno:
            fail(f"cannot load the config file: {errno[0]}")
        detail = lines[-1] if lines else type(e).__name__
        fail(detail.removeprefix("ValueError: "))
    return argv


def run(config) -> int:
    import jax

    from rlaif_jax.parallel.mesh import ConfigError, initialize_distributed, make_mesh

    if config.stage == "generate":  # inference: questions in, answers out (configs/generate.py)
        from rlaif_jax.inference.stage import check_config, run_generate
        try:
            check_config(config)
        except (ValueError, OSError) as e:
            raise ConfigError(str(e)) from None
        summary = run_generate(config)
        print(f"[generate] {json.dumps(summary)}", flush=True)
        return 0
    if config.stage == "eval":  # benchmark runners + judges, a table (configs/eval.py)
        from rlaif_jax.eval.run import run_eval
        run_eval(config)
        return 0
    # The main job calls run() again for each earlier stage, in the same process: start the
    # multi-process runtime once.
    if not jax.distributed.is_initialized():
        initialize_distributed(config.distributed)
    mesh = make_mesh(config.mesh)
    stage_dir = os.path.join(os.path.abspath(config.workdir), config.stage)
    if config.stage == "feedback":  # not a training loop: sample, describe, judge
        from rlaif_jax.feedback.stage import run_feedback
        run_feedback(config)
        return 0
    if config.stage in ("sft", "policy_init"):
        from rlaif_jax.sft.stage import build_sft_stage
        stage = build_sft_stage(config, mesh)
    elif config.stage == "rm":
        from rlaif_jax.rm.stage import build_rm_stage
        stage, stage_dir, _ = build_rm_stage(config, mesh)  # WORKDIR/rm or rm_oracle
    elif config.stage == "ppo":
        from rlaif_jax.ppo.stage import run_ppo_main
        return run_ppo_main(config, mesh, run)
    else:
        raise ConfigError(f"stage={config.stage!r} is not built in this checkout")

    from rlaif_jax.engine.loop import LoopOptions, run_stage
    if jax.process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, "config.json"), "w") as f:
            json.dump(json.loads(config.to_json_best_effort()), f, indent=2)
        print(f"[{config.stage}] mesh {dict(mesh.shape)} on {jax.device_count()} devices, "
              f"{jax.process_count()} process(es); workdir {stage_dir}", flush=True)
    options = LoopOptions(
        checkpoint_every=config.checkpoint.every, keep_checkpoints=config.checkpoint.keep,
        async_checkpoints=config.checkpoint.async_save, log_every=config.log.every,
        eval_every=config.log.eval_every, tensorboard=config.log.tensorboard,
        progress=config.log.progress)
    results = run_stage(stage, stage_dir, options)
    if jax.process_index() == 0:
        print(f"[{config.stage}] done: " + json.dumps(
            {k: round(v, 5) for k, v in sorted(results.items())}), flush=True)
    return 0


def main(argv):
    del argv
    from rlaif_jax.checkpoints.safetensors_io import CheckpointError
    from rlaif_jax.parallel.mesh import ConfigError
    from rlaif_jax.engine.loop import Preempted, TrainingDiverged

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    config = _CONFIG.value
    if config is None:
        fail("--config is required, e.g. --config=configs/sft.py")
    try:
        return run(config)
    except (ConfigError, CheckpointError) as e:
        fail(str(e).splitlines()[0])
    except TrainingDiverged as e:
        fail(str(e), EXIT_DIVERGED)
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main, flags_parser=parse_flags)
