"""The device mesh from the config, and multi-host start-up.

Mesh axes are ('data', 'fsdp', 'tensor'). A size of -1 takes whatever devices the other axes
leave, so one config runs on 8 fake CPU devices, a GPU node or a TPU pod slice unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and is meant to be printed as is."""


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the sizes of MESH_AXES (at most one -1) against the number of devices."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    free = [i for i, size in enumerate(shape) if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
    if any(size == 0 or size < -1 for size in shape):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: sizes must be positive or -1")
    fixed = math.prod(size for size in shape if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible by "
                f"the fixed axes' product {fixed}")
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {fixed} devices but {num_devices} are "
            f"present; set the sizes (e.g. --config.mesh.fsdp=-1) to multiply to {num_devices}")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh over all (or the given) devices; the device order follows the physical topology."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    try:
        # Puts the fastest links (within a host / ICI ring) on the innermost axes ('tensor').
        array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # fake CPU devices and odd topologies: plain order is all there is
        array = np.asarray(devices).reshape(shape)
    return Mesh(array, MESH_AXES)


def _env_int(*names: str) -> Optional[int]:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return None


def initialize_distributed(config: Optional[Mapping[str, Any]] = None) -> bool:
    """Starts jax.distributed when there is more than one process; returns whether it did.

    - An explicit coordinator (config `coordinator_address`, or env JAX_COORDINATOR_ADDRESS)
      with `num_processes` / `process_id` (config, or env JAX_NUM_PROCESSES / JAX_PROCESS_ID):
      GPU clusters and local multi-process runs.
    - A TPU pod slice (TPU_WORKER_HOSTNAMES lists several workers), SLURM (SLURM_NTASKS > 1) or
      Open MPI (OMPI_COMM_WORLD_SIZE > 1): jax.distributed.initialize() detects the rest.
    - Otherwise one process: nothing to do.
    Must run before anything touches a jax backend.
    """
    config = dict(config or {})
    address = config.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = config.get("num_processes", -1)
    process_id = config.get("process_id", -1)
    if num_processes is None or num_processes < 0:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None or process_id < 0:
        process_id = _env_int("JAX_PROCESS_ID")
    kwargs = {}
    if config.get("local_device_ids"):
        kwargs["local_device_ids"] = [int(i) for i in str(config["local_device_ids"]).split(",")]
    if address:
        if num_processes is None or process_id is None:
            raise ConfigError(
                f"distributed.coordinator_address={address!r} needs num_processes and process_id "
                "(config distributed.* or env JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    auto = (len([h for h in tpu_hosts.split(",") if h]) > 1
            or (_env_int("SLURM_NTASKS") or 1) > 1
            or (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1)
    if auto:
        jax.distributed.initialize(**kwargs)
        return True
    logging.info("one process: jax.distributed is not started")
    return False
