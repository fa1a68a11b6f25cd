"""Reading the reference's JSON items, checking them, and turning them into tfds examples.

Kinds (docs/method.md's formats):
- instruction: `{id, images|video, conversations}` (SFT, policy init, judge training)
- preference:  `{images, conversations, output_1: {value}, output_2: {value}, preference: 1|2}`
- prompt:      `{uid, images, conversations}`: PPO prompts, the first human turn is the prompt
- qa:          `{video_name, question_id, question, answer}` (zero-shot QA),
               `{video_name, Q, A}` (Video-ChatGPT generic and temporal),
               `{video_name, Q1, Q2, A}` (Video-ChatGPT consistency)
"""
from __future__ import annotations

import json

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rlaif_jax.data import prompts
from rlaif_jax.data.video import find_video_by_name, resolve_source

KINDS = ("instruction", "preference", "prompt", "qa")
NO_VIDEO = -1


def load_items(json_path: str) -> list:
    """A JSON list, or JSON lines (one object a line); local or on a bucket (gs://...)."""
    with tf.io.gfile.GFile(json_path) as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def video_source(item: dict, kind: str, video_root: str):
    """The item's video as a path or a list of frame paths (see video.resolve_source); None if
    the item has no video."""
    if kind == "qa":
        return find_video_by_name(video_root, str(item["video_name"]))
    for key in ("video", "images", "image"):
        if item.get(key):
            return resolve_source(item[key], video_root)
    return None


def source_key(source) -> str:
    """One string per distinct video, so items sharing a video share its decoded frames."""
    return "\n".join(source) if isinstance(source, list) else source


def _turns_are_valid(turns) -> bool:
    return (isinstance(turns, list) and bool(turns) and all(
        isinstance(t, dict) and t.get("from") in prompts.ROLE_NAMES
        and isinstance(t.get("value"), str) for t in turns))


def check_item(item, kind: str, has_video: bool) -> str | None:
    """None for a good item, else the reason it is skipped (a key of the build's counts)."""
    if not isinstance(item, dict):
        return "malformed"
    if kind == "qa":
        keys = set(item)
        if "video_name" not in keys or not (
                {"question", "answer"} <= keys or {"Q", "A"} <= keys or {"Q1", "Q2", "A"} <= keys):
            return "malformed"
        return None
    turns = item.get("conversations")
    if not _turns_are_valid(turns) or not any(t["from"] == "human" for t in turns):
        return "malformed"
    if kind == "preference":
        outputs = [item.get("output_1"), item.get("output_2")]
        if not all(isinstance(o, dict) and isinstance(o.get("value"), str) for o in outputs):
            return "malformed"
        if item.get("preference") not in (1, 2):
            return "malformed"
    # Prompts only keep the first human turn, so that is where the placeholder must be.
    human = [t["value"] for t in turns if t["from"] == "human"]
    placeholders = sum(v.count(prompts.IMAGE_TOKEN) for v in (human[:1] if kind == "prompt" else human))
    if has_video and placeholders == 0:
        return "video_without_placeholder"
    if not has_video and placeholders > 0:
        return "placeholder_without_video"
    if placeholders > 1:
        return "several_placeholders"
    return None


def features(kind: str) -> tfds.features.FeaturesDict:
    common = {"id": tfds.features.Text(), "video": tfds.features.Scalar(dtype=np.int64)}
    turns = {"roles": tfds.features.Sequence(tfds.features.Text()),
             "values": tfds.features.Sequence(tfds.features.Text())}
    if kind in ("instruction", "prompt"):
        return tfds.features.FeaturesDict({**common, **turns})
    if kind == "preference":
        return tfds.features.FeaturesDict({
            **common, **turns, "output_1": tfds.features.Text(),
            "output_2": tfds.features.Text(), "preference": tfds.features.Scalar(dtype=np.int32)})
    if kind == "qa":
        return tfds.features.FeaturesDict({
            **common, "video_name": tfds.features.Text(), "format": tfds.features.Text(),
            "question": tfds.features.Text(), "question_2": tfds.features.Text(),
            "answer": tfds.features.Text()})
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def to_example(item: dict, kind: str, position: int, video_index: int) -> dict:
    """The stored example of a good item (text stays text: the pipeline tokenises)."""
    if kind == "qa":
        if "question" in item:
            fmt, q, q2, a = "qa", item["question"], "", item["answer"]
        elif "Q1" in item:
            fmt, q, q2, a = "consistency", item["Q1"], item["Q2"], item["A"]
        else:
            fmt, q, q2, a = "benchmark", item["Q"], "", item["A"]
        identifier = item.get("question_id", f"{item['video_name']}#{position}")
        return {"id": str(identifier), "video": video_index, "video_name": str(item["video_name"]),
                "format": fmt, "question": str(q), "question_2": str(q2), "answer": str(a)}
    identifier = item.get("id", item.get("uid", position))
    example = {"id": str(identifier), "video": video_index,
               "roles": [t["from"] for t in item["conversations"]],
               "values": [t["value"] for t in item["conversations"]]}
    if kind == "preference":
        example.update(output_1=item["output_1"]["value"], output_2=item["output_2"]["value"],
                       preference=int(item["preference"]))
    return example
