"""Tensor-by-tensor reading and sharded writing of safetensors checkpoints (HF layout)."""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending tensor."""


class SafetensorsReader:
    """Reads one tensor at a time from `model.safetensors` or a sharded index, memory-mapped."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self._file_of = dict(json.load(f)["weight_map"])
        elif os.path.exists(single_path):
            with safe_open(single_path, framework="numpy") as f:
                self._file_of = {key: SINGLE_FILE for key in f.keys()}
        else:
            raise CheckpointError(
                f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors are read)")
        self._open = {}

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> np.ndarray:
        if key not in self._file_of:
            raise CheckpointError(f"checkpoint {self.directory} is missing tensor {key!r}")
        filename = self._file_of[key]
        if filename not in self._open:
            self._open[filename] = safe_open(
                os.path.join(self.directory, filename), framework="numpy")
        return self._open[filename].get_tensor(key)


def write_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]], directory: str, max_shard_bytes: int = 5 << 30
) -> list[str]:
    """Writes (name, array) pairs as HF does: one file, or shards plus an index past the limit.

    Only one shard is held in host memory at a time.
    """
    os.makedirs(directory, exist_ok=True)
    shards: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush(batch):
        name = f"model-{len(shards) + 1:05d}.safetensors.tmp"
        save_file(batch, os.path.join(directory, name), metadata={"format": "pt"})
        shards.append(name)
        for key in batch:
            weight_map[key] = name

    batch, batch_bytes = {}, 0
    for key, array in tensors:
        array = np.ascontiguousarray(array)
        if batch and batch_bytes + array.nbytes > max_shard_bytes:
            flush(batch)
            batch, batch_bytes = {}, 0
        batch[key] = array
        batch_bytes += array.nbytes
        total += array.nbytes
    if batch or not shards:
        flush(batch)

    if len(shards) == 1:
        os.replace(os.path.join(directory, shards[0]), os.path.join(directory, SINGLE_FILE))
        return [SINGLE_FILE]
    final = {}
    for i, tmp in enumerate(shards):
        final[tmp] = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(directory, tmp), os.path.join(directory, final[tmp]))
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return list(final.values())

