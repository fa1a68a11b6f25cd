"""One entry point for every stage: `python launch/main.py --config=configs/sft.py[:preset]`.

Every process of a multi-host job runs the same command. The stage writes under
WORKDIR/<stage>/: checkpoints/<step>/, metrics.jsonl, tensorboard/, config.json.
`--config=configs/ppo.py` is the main job: the earlier stages first (their configs come from
the PPO config file's `chain_config`), PPO, the control and the held-out table.
A bad config or a missing checkpoint stops at start with one line on stderr and exit status 2;
a preempted run (SIGTERM) saves and exits 143; a diverged run (NaN/Inf) exits 1.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys

# Before the data layer imports tensorflow, which here only reads and writes data: its start-up
# notices (oneDNN kernels that never run) would precede every run's output and error line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rlaif_jax import main_job, stages  # noqa: E402
from rlaif_jax.checkpoints.safetensors_io import CheckpointError  # noqa: E402
from rlaif_jax.engine.loop import Preempted, TrainingDiverged  # noqa: E402
from rlaif_jax.parallel.mesh import ConfigError  # noqa: E402

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


def chain_configs(config_file: str, config):
    """stage -> its config for the main job, from the PPO config file's `chain_config`; None
    when the file defines no chain (then every earlier stage must already be done)."""
    path = config_file.split(":")[0]
    spec = importlib.util.spec_from_file_location("_main_job_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "chain_config"):
        return None
    return functools.partial(module.chain_config, config)


def run(config) -> int:
    if config.stage == "ppo":  # configs/ppo.py: the main job
        mesh = stages.runtime_mesh(config)
        main_job.run(config, mesh, chain_configs(config_flags.get_config_filename(
            flags.FLAGS["config"]), config))
    else:
        stages.run_stage(config)
    return 0


def main(argv):
    del argv
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
    app.run(main, flags_parser=parse_flags)
