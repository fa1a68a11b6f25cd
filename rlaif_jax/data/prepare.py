"""The `data` stage of a workdir: the synthetic world and its tfds builds, made on first use.

    WORKDIR/data/world/                   generate_world(...) (videos, truth, JSON, tokenizer)
    WORKDIR/data/<build>/                 rlaif_jax.data.build.build(...) of some world JSON files

Each artefact is written by process 0 only, into a temporary directory renamed into place when
complete, so an interrupted run never leaves half a world behind; the other processes wait at a
barrier and then read it (the workdir is shared by every host, as for checkpoints). A world that
exists is reused only if it was generated with the same arguments: anything else stops the run
with a message, since a stage must never train on a world other than the one its config names.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
from jax.experimental import multihost_utils

from rlaif_jax.data.build import BUILD_INFO, build
from rlaif_jax.data.synthetic import generate_world

WORLD_ARGS_FILE = "world_args.json"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _make_once(path: str, make, what: str) -> None:
    """Runs make(tmp_path) on process 0 when `path` does not exist, then renames it into place."""
    if jax.process_index() == 0 and not os.path.isdir(path):
        tmp = path + ".incomplete"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        print(f"[data] making {what} in {path}", flush=True)
        make(tmp)
        os.replace(tmp, path)
    _barrier(f"data:{path}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} was not made (is the workdir shared by every host?)")


def prepare_world(world_dir: str, world_args: dict, progress: bool = True) -> str:
    """The synthetic world at `world_dir`, generated with `world_args` (generate_world's keyword
    arguments) unless it is there already (with the same arguments)."""
    args = {k: int(v) for k, v in dict(world_args).items()}

    def make(out):
        generate_world(out, progress=progress and jax.process_index() == 0, **args)
        with open(os.path.join(out, WORLD_ARGS_FILE), "w") as f:
            json.dump(args, f)

    _make_once(world_dir, make, "the synthetic world")
    marker = os.path.join(world_dir, WORLD_ARGS_FILE)
    if os.path.isfile(marker):  # a world made by prepare_world (not one made by hand)
        with open(marker) as f:
            existing = json.load(f)
        if existing != args:
            raise ValueError(f"{world_dir} holds a world made with {existing}, but the config "
                             f"asks for {args}: use another workdir or data.world")
    return world_dir


def prepare_build(world_dir: str, build_dir: str, kind: str, splits: dict[str, str],
                  num_frames: int, size: int) -> str:
    """A tfds build at `build_dir` of the world's JSON files `splits` ({split: file name})."""
    # QA files name videos without a path: their root is the videos folder.
    video_root = os.path.join(world_dir, "videos") if kind == "qa" else world_dir
    files = {split: os.path.join(world_dir, name) for split, name in splits.items()}
    _make_once(build_dir, lambda out: build(kind, files, video_root, out, num_frames=num_frames,
                                            size=size, verbose=False),
               f"the {kind} build of {sorted(files)}")
    with open(os.path.join(build_dir, BUILD_INFO)) as f:
        info = json.load(f)
    if info["kind"] != kind or sorted(info["splits"]) != sorted(splits):
        raise ValueError(f"{build_dir} holds a {info['kind']} build of splits "
                         f"{sorted(info['splits'])}, not the {kind} build of {sorted(splits)} "
                         "the config asks for")
    return build_dir
