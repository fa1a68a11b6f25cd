"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; the session fixtures of
tests/support.py, visible to every test package."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests.support import (instruction_data, llama_tokenizer, mixed_data,  # noqa: E402,F401
                           preference_data, prompt_data, qa_data, smoke_workdir, world_dir,
                           world_tokenizer)
