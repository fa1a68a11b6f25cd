"""Builds tfds datasets (array_record) from the reference JSON and a folder of videos.

    python -m rlaif_jax.data.build --kind {instruction,preference,prompt,qa} \
        --json FILE [--json SPLIT=FILE ...] --video_root DIR --out DATA_DIR \
        [--frames 8 --size 64 --workers 2] [--beam_runner DirectRunner [--beam_options ...]]

`--json FILE` makes the split "train"; `--json short=a.json --json long=b.json` makes two splits
(a curriculum) that share one table of frames. Layout of DATA_DIR:

    video_frames/1.0.0/    one record per distinct video (index = video id)
    items/<kind>/1.0.0/    the kept items of each split
    build.json             kind, splits, frame settings, counts built and skipped (with reasons)

Bad input never stops the build: an item whose video is missing, empty or corrupt, an item with
a video but no `<image>` (or the reverse), and a malformed item are skipped and counted.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time

import tensorflow as tf
import tensorflow_datasets as tfds

from rlaif_jax.data.builders import frames_builder, items_builder, items_json

BUILD_INFO = "build.json"
FILE_FORMAT = "array_record"


def _beam_config(beam_runner: str | None, beam_options: str | None):
    if not beam_runner:
        return None
    beam = tfds.core.lazy_imports.apache_beam
    options = beam.options.pipeline_options.PipelineOptions(
        flags=beam_options.split() if beam_options else [])
    return tfds.download.DownloadConfig(beam_runner=beam_runner, beam_options=options)


def _remove_tree(path: str) -> None:
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


def _prepare(builder, download_config, out_dir: str) -> None:
    downloads = os.path.join(out_dir, "downloads")  # tfds makes it; nothing is downloaded
    builder.download_and_prepare(download_dir=downloads,
                                 download_config=download_config or tfds.download.DownloadConfig())
    _remove_tree(downloads)


def _read_beam_statuses(status_path: str) -> dict[int, dict]:
    statuses = {}  # tf.io.gfile: the output may be on a bucket (gs://...) with a remote runner
    for path in sorted(tf.io.gfile.glob(status_path + "*")):
        with tf.io.gfile.GFile(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    statuses[int(record.pop("id"))] = record
    return statuses


def build(kind: str, json_files: dict[str, str], video_root: str, out_dir: str,
          num_frames: int = 8, size: int = 64, workers: int = 2, beam_runner: str | None = None,
          beam_options: str | None = None, overwrite: bool = False, verbose: bool = True) -> dict:
    """Builds DATA_DIR; returns (and writes to build.json) what was built and what was skipped."""
    if kind not in items_json.KINDS:
        raise ValueError(f"--kind must be one of {items_json.KINDS}, not {kind!r}")
    if tf.io.gfile.exists(os.path.join(out_dir, BUILD_INFO)):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds a build; pass --overwrite")
        for sub in ("video_frames", "items", "video_status"):
            _remove_tree(os.path.join(out_dir, sub))
        tf.io.gfile.remove(os.path.join(out_dir, BUILD_INFO))
    tf.io.gfile.makedirs(out_dir)
    started = time.time()
    download_config = _beam_config(beam_runner, beam_options)

    # 1. Read and check items; give each distinct video of a good item an id.
    skipped: dict[str, collections.Counter] = {}
    pending: dict[str, list[tuple[int, dict, int]]] = {}
    video_ids: dict[str, int] = {}
    sources: list = []
    for split, json_path in json_files.items():
        skipped[split] = collections.Counter()
        pending[split] = []
        for position, item in enumerate(items_json.load_items(json_path)):
            try:
                source = video_source_or_none(item, kind, video_root)
            except (KeyError, TypeError, AttributeError):
                skipped[split]["malformed"] += 1
                continue
            reason = items_json.check_item(item, kind, has_video=source is not None)
            if reason:
                skipped[split][reason] += 1
                continue
            video_id = items_json.NO_VIDEO
            if source is not None:
                key = items_json.source_key(source)
                if key not in video_ids:
                    video_ids[key] = len(sources)
                    sources.append(source)
                video_id = video_ids[key]
            pending[split].append((position, item, video_id))

    # 2. Decode every distinct video once.
    statuses: dict[int, dict] = {}
    if sources:
        status_path = os.path.join(out_dir, "video_status", frames_builder.STATUS_PREFIX)
        frames = frames_builder.VideoFrames(
            data_dir=out_dir, file_format=FILE_FORMAT, sources=sources, num_frames=num_frames,
            size=size, workers=workers, use_beam=download_config is not None,
            status_path=status_path)
        _prepare(frames, download_config, out_dir)
        statuses = frames.statuses or _read_beam_statuses(status_path)
        if len(statuses) != len(sources):
            raise RuntimeError(f"decoded {len(statuses)} of {len(sources)} videos")

    # 3. Keep the items whose video decoded; write them.
    kept: dict[str, list[dict]] = {}
    for split, entries in pending.items():
        examples = []
        for position, item, video_id in entries:
            if video_id != items_json.NO_VIDEO and not statuses[video_id]["ok"]:
                skipped[split][statuses[video_id]["error"]] += 1
                continue
            examples.append(items_json.to_example(item, kind, position, video_id))
        if examples:  # tfds refuses empty splits; an empty split is reported instead
            kept[split] = examples
    if kept:
        items = items_builder.Items(data_dir=out_dir, config=kind, file_format=FILE_FORMAT,
                                    splits=kept, use_beam=download_config is not None)
        _prepare(items, download_config, out_dir)

    backends = collections.Counter(s["backend"] for s in statuses.values() if s["ok"])
    info = {
        "kind": kind,
        "splits": {split: len(kept.get(split, [])) for split in json_files},
        "skipped": {split: dict(counts) for split, counts in skipped.items()},
        "skipped_total": dict(sum(skipped.values(), collections.Counter())),
        "videos": {"total": len(sources), "ok": sum(s["ok"] for s in statuses.values()),
                   "decoded_by": dict(backends)},
        "num_frames": num_frames, "size": size,
        "json": json_files, "video_root": video_root,
        "frames_dir": "video_frames/1.0.0" if sources else None,
        "items_dir": f"items/{kind}/1.0.0" if kept else None,
        "beam_runner": beam_runner, "seconds": round(time.time() - started, 2),
    }
    with tf.io.gfile.GFile(os.path.join(out_dir, BUILD_INFO), "w") as f:
        f.write(json.dumps(info, indent=1))
    if verbose:
        print(json.dumps({"built": info["splits"], "skipped": info["skipped"],
                          "videos": info["videos"], "seconds": info["seconds"]}))
    return info


def video_source_or_none(item, kind: str, video_root: str):
    if not isinstance(item, dict):
        return None
    return items_json.video_source(item, kind, video_root)


def _parse_json_args(values: list[str]) -> dict[str, str]:
    splits = {}
    for value in values:
        split, _, path = value.partition("=") if "=" in value else ("train", "", value)
        if split in splits:
            raise ValueError(f"split {split!r} given twice")
        splits[split] = path
    return splits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", required=True, choices=items_json.KINDS)
    parser.add_argument("--json", required=True, action="append",
                        help="FILE (split 'train') or SPLIT=FILE; repeat for several splits")
    parser.add_argument("--video_root", default="", help="video paths are relative to this")
    parser.add_argument("--out", required=True, help="the DATA_DIR to write")
    parser.add_argument("--frames", type=int, default=8, help="frames stored per video")
    parser.add_argument("--size", type=int, default=64, help="frame side after preprocessing")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (no Beam)")
    parser.add_argument("--beam_runner", default=None, help="e.g. DirectRunner, DataflowRunner")
    parser.add_argument("--beam_options", default=None,
                        help="Beam pipeline flags, e.g. '--direct_num_workers=2'")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    build(args.kind, _parse_json_args(args.json), args.video_root, args.out, args.frames,
          args.size, args.workers, args.beam_runner, args.beam_options, args.overwrite)


if __name__ == "__main__":
    main()
