"""Shared pieces of the CPU benchmarks: alternated timing, the matmul ceiling, machine facts."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable


def add_llama_dims(parser: argparse.ArgumentParser, runs: int) -> argparse.ArgumentParser:
    """The LLaMA shape every CPU comparison shares (the default dims of docs/benchmarks.md:
    hidden 512, 8 layers, 8 heads, vocabulary 32000) and how many alternated runs to time."""
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--runs", type=int, default=runs)
    return parser


def add_train_step_layout(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """How our train steps lay out the layers and attention on CPU. Unrolled layers: a scanned
    stack makes XLA:CPU zero-fill and slice [layers, ...] buffers for the saved activations and
    the weight gradients every step (7-11% of these steps, docs/benchmarks.md); the presets keep
    the scan, whose compile time and memory pay on TPU and GPU."""
    parser.add_argument("--scan_layers", type=int, default=0,
                        help="1: the layers as one scanned stack (the presets' layout)")
    parser.add_argument("--attention_block", type=int, default=128,
                        help="causal query blocks (LlamaConfig.attention_block); 0: dense")
    return parser


def alternate(runners: dict[str, Callable[[], None]], runs: int) -> dict[str, dict]:
    """Times each runner `runs` times, alternating between them (so load that comes and goes
    hits every side alike) after one untimed warm-up call each. Returns per name the median
    wall and process-CPU seconds and every wall time."""
    for run in runners.values():
        run()
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"wall_s": statistics.median(wall[name]),
                   "cpu_s": statistics.median(cpu[name]),
                   "wall_all_s": [round(t, 4) for t in wall[name]]} for name in runners}


_TORCH_DEFAULT_THREADS = 0  # torch's own default, before any probe changed it


def fastest_torch_threads(probe: Callable[[], None]) -> dict[int, float]:
    """Runs `probe` (a short piece of the PyTorch side's work) once with torch's default thread
    count and once with 1 thread, and leaves torch on the faster; returns {threads: seconds}.

    Why: with other processes on the cores, torch's OpenMP threads wait for each other at every
    op (on 2 cores at load average 5, `generate` ran 20 times slower with 2 threads than with
    1). Their best setting keeps the ratio from flattering us on a busy machine; on a quiet one
    the default wins and nothing changes."""
    import torch

    global _TORCH_DEFAULT_THREADS
    _TORCH_DEFAULT_THREADS = _TORCH_DEFAULT_THREADS or torch.get_num_threads()
    seconds = {}
    for threads in sorted({_TORCH_DEFAULT_THREADS, 1}, reverse=True):
        torch.set_num_threads(threads)
        probe()  # warm-up at this setting
        start = time.perf_counter()
        probe()
        seconds[threads] = round(time.perf_counter() - start, 4)
    torch.set_num_threads(min(seconds, key=seconds.get))
    return seconds


def matmul_ceiling_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best observed float32 matmul rate of this machine through XLA (FLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (a ratio that holds on one CPU may not on
    another: every line says which it came from)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a reader needs to judge a timing: the CPU, cores, load, thread settings."""
    import torch

    return {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
