"""Opening a DATA_DIR written by `rlaif_jax.data.build`: its items and frames, read by index."""
from __future__ import annotations

import functools
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rlaif_jax.data.build import BUILD_INFO


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: dict) -> dict:
    """tfds gives bytes for text: turn them into str (and lists of str)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (bytes, np.bytes_)):
            out[key] = _text(value)
        elif isinstance(value, (list, np.ndarray)) and len(value) and isinstance(
                value[0], (bytes, np.bytes_)):
            out[key] = [_text(v) for v in value]
        else:
            out[key] = value
    return out


class BuiltData:
    """The items of each split and the frames table of one build (random access)."""

    def __init__(self, data_dir: str):
        path = os.path.join(data_dir, BUILD_INFO)
        if not tf.io.gfile.exists(path):  # local or a bucket (gs://...)
            raise FileNotFoundError(f"{data_dir} is not a build (no {BUILD_INFO}); "
                                    "run python -m rlaif_jax.data.build first")
        with tf.io.gfile.GFile(path) as f:
            self.info = json.loads(f.read())
        self.data_dir = data_dir
        self.kind: str = self.info["kind"]
        self.splits = {s: n for s, n in self.info["splits"].items() if n > 0}

    @functools.cached_property
    def _items_builder(self):
        if not self.info["items_dir"]:
            raise ValueError(f"{self.data_dir}: the build kept no items")
        return tfds.builder_from_directory(os.path.join(self.data_dir, self.info["items_dir"]))

    @functools.lru_cache(maxsize=None)
    def items(self, split: str):
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in {self.data_dir} (has {sorted(self.splits)})")
        return self._items_builder.as_data_source(split=split)

    @functools.cached_property
    def frames(self):
        """Data source of {"frames": uint8 [T, S, S, 3], "ok", ...}; None for a text-only build."""
        if not self.info["frames_dir"]:
            return None
        builder = tfds.builder_from_directory(os.path.join(self.data_dir, self.info["frames_dir"]))
        return builder.as_data_source(split="videos")

    @property
    def num_frames(self) -> int:
        return int(self.info["num_frames"])

    @property
    def size(self) -> int:
        return int(self.info["size"])
