"""tfds builder of decoded frames: one record per distinct video, its record index = its id.

Videos are decoded once at build time (many items share a video) so that training never decodes
video. A video that cannot be read still gets a record, with zero frames, `ok` False and the
reason, so that ids stay positions; no kept item points at it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from rlaif_jax.data import video

STATUS_PREFIX = "video_status"


def decode_record(video_id: int, source, num_frames: int, size: int) -> tuple[int, dict]:
    """(key, example) for one video; never raises on bad input."""
    key = source if isinstance(source, str) else "\n".join(source)
    try:
        frames, _, backend = video.load_frames_with_info(source, num_frames, size)
        return video_id, {"frames": frames, "ok": True, "source": key, "backend": backend,
                          "error": ""}
    except video.VideoDecodeError as error:
        reason = error.reason
    except Exception:  # anything else a broken file may raise inside a decoder
        reason = "corrupt"
    empty = np.zeros((0, size, size, 3), np.uint8)
    return video_id, {"frames": empty, "ok": False, "source": key, "backend": "",
                      "error": reason}


def status_of(example: dict) -> dict:
    return {"ok": bool(example["ok"]), "error": example["error"], "backend": example["backend"]}


class VideoFrames(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Decoded frames, uint8 [T, S, S, 3] a video (T = 0 for a video that failed)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, sources: Sequence = (), num_frames: int = 8, size: int = 64,
                 workers: int = 2, use_beam: bool = False, status_path: str = "", **kwargs):
        self._sources = list(sources)
        self._num_frames, self._size, self._workers = num_frames, size, workers
        self._use_beam, self._status_path = use_beam, status_path
        self.statuses: dict[int, dict] = {}  # filled while generating without Beam
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Frames decoded once per video, sampled with linspace, padded to "
                        "square and resized.",
            features=tfds.features.FeaturesDict({
                # Stored as raw bytes: the default encoding writes one int64 per pixel.
                "frames": tfds.features.Tensor(shape=(None, self._size, self._size, 3),
                                               dtype=np.uint8,
                                               encoding=tfds.features.Encoding.BYTES),
                "ok": tfds.features.Scalar(dtype=np.bool_),
                "source": tfds.features.Text(),
                "backend": tfds.features.Text(),
                "error": tfds.features.Text(),
            }),
            disable_shuffling=True,  # records sorted by key: the record index is the video id
            metadata=tfds.core.MetadataDict(num_frames=self._num_frames, size=self._size),
        )

    def _split_generators(self, dl_manager):
        return {"videos": self._generate_examples()}

    def _generate_examples(self):
        if self._use_beam:
            return _beam_decode(self._sources, self._num_frames, self._size, self._status_path)
        return self._decode_in_threads()

    def _decode_in_threads(self) -> Iterator[tuple[int, dict]]:
        """decord and PIL release the GIL, so threads decode in parallel; a bounded window of
        futures keeps memory flat and the output in order."""
        window = collections.deque()
        jobs = iter(enumerate(self._sources))
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool, \
                tqdm(total=len(self._sources), desc="decode videos", unit="video") as bar:
            def submit_next() -> None:
                job = next(jobs, None)
                if job is not None:
                    window.append(pool.submit(decode_record, *job, self._num_frames, self._size))
            for _ in range(4 * self._workers):
                submit_next()
            while window:
                key, example = window.popleft().result()
                submit_next()
                self.statuses[key] = status_of(example)
                bar.update()
                yield key, example


def _beam_decode(sources: list, num_frames: int, size: int, status_path: str):
    beam = tfds.core.lazy_imports.apache_beam

    @beam.ptransform_fn
    def decode_all(root):
        decoded = (root | "Sources" >> beam.Create(list(enumerate(sources)))
                   | "Reshuffle" >> beam.Reshuffle()  # spread the decoding over workers
                   | "Decode" >> beam.Map(lambda job: decode_record(*job, num_frames, size)))
        # The build needs every video's status; Beam writes them next to the data.
        _ = (decoded | "Status" >> beam.Map(lambda kv: json.dumps({"id": kv[0], **status_of(kv[1])}))
             | "WriteStatus" >> beam.io.WriteToText(status_path, file_name_suffix=".jsonl"))
        return decoded

    return decode_all()
