"""The reward model's data: preference pairs checked, labelled (AI or true preference) and split
by video into train and held-out sets, then built into tfds data under WORKDIR/<rm stage>/data.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from rlaif_jax.data.build import build
from rlaif_jax.data.builders.items_json import load_items
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.workdir.files import atomic_write_json
from rlaif_jax.workdir.layout import resolve_init, world_dir

# Which preference the RM learns, and the stage directory it trains in: the judge's with context
# (RLAIF), the same judge's without context (the paper's context ablation), the truth (the
# oracle control; the synthetic world only).
LABELS = {"ai": "rm", "ai_no_context": "rm_no_context", "truth": "rm_oracle"}
LABEL_KEYS = {"ai": "preference", "ai_no_context": "preference_no_context",
              "truth": "true_preference"}


def check_preference_item(item: Any) -> str | None:
    """None for a usable pair, else why it is skipped (counted in the stage's metrics)."""
    if not isinstance(item, dict):
        return "malformed"
    for key in ("output_1", "output_2"):
        output = item.get(key)
        if not isinstance(output, dict) or not isinstance(output.get("value"), str):
            return "missing_output"
    if item.get("preference") not in (1, 2) or isinstance(item.get("preference"), bool):
        return "invalid_preference"
    return None


def _video_key(item: dict) -> str:
    images = item.get("images", item.get("video", ""))
    return json.dumps(images, sort_keys=True)


def longer_answer(item: dict) -> Optional[int]:
    """1 or 2: the answer with more words (a heuristic baseline); None when they tie."""
    lengths = [len(item[key]["value"].split()) for key in ("output_1", "output_2")]
    return None if lengths[0] == lengths[1] else 1 + int(lengths[1] > lengths[0])


def split_preferences(items: Sequence[Any], labels: str, heldout_fraction: float,
                      heldout_max: int, seed: int) -> tuple[list, list, dict, dict]:
    """(train items, held-out items, {id: {'ai', 'truth', 'decisive'}}, skip counts).

    Items are checked (missing output, invalid preference: skipped and counted), given an id if
    they have none, labelled as `labels` says (LABELS: the judge's preference with or without
    context, or the truth; items without that label are skipped), and split by video so that no held-out video
    was seen in training."""
    skipped: collections.Counter = collections.Counter()
    usable, table = [], {}
    for position, item in enumerate(items):
        reason = check_preference_item(item)
        if reason is None and labels != "ai" and item.get(LABEL_KEYS[labels]) not in (1, 2):
            reason = "no_truth" if labels == "truth" else "no_label_without_context"
        if reason:
            skipped[reason] += 1
            continue
        item = dict(item, id=str(item.get("id", position)))
        if item["id"] in table:
            skipped["duplicate_id"] += 1
            continue
        truth = item.get("true_preference")
        scores = item.get("true_scores")
        table[item["id"]] = {"ai": int(item["preference"]),
                             "truth": int(truth) if truth in (1, 2) else None,
                             "decisive": bool(scores and scores[0] != scores[1]),
                             "longer": longer_answer(item)}
        item["preference"] = int(item[LABEL_KEYS[labels]])
        usable.append(item)
    videos = sorted({_video_key(item) for item in usable})
    order = np.random.default_rng(seed).permutation(len(videos))
    wanted = min(int(round(heldout_fraction * len(usable))), heldout_max)
    heldout_videos, count = set(), 0
    counts = collections.Counter(_video_key(item) for item in usable)
    for index in order:
        if count >= wanted:
            break
        heldout_videos.add(videos[index])
        count += counts[videos[index]]
    train = [item for item in usable if _video_key(item) not in heldout_videos]
    heldout = [item for item in usable if _video_key(item) in heldout_videos]
    return train, heldout, table, dict(skipped)


def prepare_data(config, paths: dict, out_dir: str, num_frames: int, size: int) -> dict:
    """Writes the splits and their tfds build under `out_dir`; returns the preparation info
    (reused when the source, labels and frame settings are unchanged)."""
    info_path = os.path.join(out_dir, "prepared.json")
    key = {"preferences": paths["preferences"], "labels": config.labels,
           "mtime": os.path.getmtime(paths["preferences"]), "frames": num_frames, "size": size,
           "heldout_fraction": config.eval.heldout_fraction,
           "heldout_max": config.eval.heldout_max, "seed": config.seed}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("key") == key:
            return info
    os.makedirs(out_dir, exist_ok=True)
    train, heldout, table, skipped = split_preferences(
        load_items(paths["preferences"]), config.labels, config.eval.heldout_fraction,
        config.eval.heldout_max, config.seed)
    if not train or not heldout:
        raise ConfigError(f"{paths['preferences']}: {len(train)} training and {len(heldout)} "
                          f"held-out pairs after checks (skipped: {skipped}); need both")
    files = {}
    for split, split_items in (("train", train), ("heldout", heldout)):
        files[split] = os.path.join(out_dir, f"{split}.json")
        with open(files[split], "w") as f:
            json.dump(split_items, f)
    built = build("preference", files, paths["video_root"], os.path.join(out_dir, "build"),
                  num_frames, size, overwrite=True, verbose=False)
    info = {"key": key, "labels_table": table, "skipped": skipped,
            "build_skipped": built["skipped_total"], "splits": built["splits"]}
    atomic_write_json(info_path, info)
    return info


def resolve_paths(config) -> dict:
    workdir = os.path.abspath(config.workdir)
    world = world_dir(workdir, config.world_dir)
    init = resolve_init(workdir, config.init)
    paths = {"init": init or os.path.join(workdir, "sft"),
             "preferences": config.preferences or os.path.join(workdir, "feedback",
                                                               "preferences.json"),
             "video_root": config.video_root or world,
             "tokenizer": config.tokenizer or os.path.join(world, "tokenizer")}
    if config.labels not in LABELS:
        raise ConfigError(f"labels={config.labels!r}: expected one of {sorted(LABELS)}")
    if not os.path.isfile(paths["preferences"]):
        raise ConfigError(f"preference file {paths['preferences']} does not exist (run the "
                          "feedback stage first, or set config.preferences)")
    return paths
