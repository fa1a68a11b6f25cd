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


def _stored_value(feature, stored):
    """One feature of a tf.train.Example as tfds's decoding (then `decode_record`) gives it, for
    the kinds a build writes: Text, a Sequence of Text, an integer or bool Scalar, and a Tensor
    of raw bytes (Encoding.BYTES)."""
    if isinstance(feature, tfds.features.Sequence):
        return [_text(v) for v in stored.bytes_list.value]
    if isinstance(feature, tfds.features.Text):
        return _text(stored.bytes_list.value[0])
    if feature.shape == ():
        value = stored.int64_list.value[0]
        return bool(value) if feature.np_dtype == np.bool_ else int(value)
    array = np.frombuffer(stored.bytes_list.value[0], feature.np_dtype)
    return array.reshape((-1,) + tuple(feature.shape[1:]))


def _raw_source(builder, split: str):
    """The split's records as tf.train.Example protos, to be read with `_stored_value`: tfds's
    per-feature decoding costs several times the read itself (0.05 ms against 0.01 ms an item)."""
    return builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE)


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

    def item_records(self, split: str) -> list[dict]:
        """Every item of a split, as `decode_record(items(split)[i])` gives them."""
        source = _raw_source(self._items_builder, split)
        features = self._items_builder.info.features
        return [{key: _stored_value(feature, example.features.feature[key])
                 for key, feature in features.items()}
                for example in source.__getitems__(range(len(source)))]

    @functools.cached_property
    def _frames_builder(self):
        return tfds.builder_from_directory(os.path.join(self.data_dir, self.info["frames_dir"]))

    @functools.cached_property
    def frames(self):
        """Data source of {"frames": uint8 [T, S, S, 3], "ok", ...}; None for a text-only build."""
        if not self.info["frames_dir"]:
            return None
        return self._frames_builder.as_data_source(split="videos")

    @functools.cached_property
    def _raw_frames(self):
        return _raw_source(self._frames_builder, "videos")

    def video_frames(self, video_id: int) -> np.ndarray:
        """frames[video_id]["frames"] (read-only), without decoding the record's other fields."""
        example = self._raw_frames[int(video_id)]
        return _stored_value(self._frames_builder.info.features["frames"],
                             example.features.feature["frames"])

    @property
    def num_frames(self) -> int:
        return int(self.info["num_frames"])

    @property
    def size(self) -> int:
        return int(self.info["size"])
