"""Vision pre-training of the tiny tower (rlaif_jax/sft/vision_pretrain.py)."""

import json
import os

import jax
import numpy as np
import pytest

from configs import models
from rlaif_jax.data.synthetic import render, world
from rlaif_jax.models.clip_vision import ClipVisionConfig
from rlaif_jax.sft import vision_pretrain
from rlaif_jax.sft.vision_pretrain import (FRAME_TARGETS, TARGETS, frame_targets,
                                             pretrained_tower, visual_targets)


def _target(targets: np.ndarray, name: str) -> int:
    return int(targets[[n for n, _ in TARGETS].index(name)])


def test_targets_name_each_visible_fact_and_absent_shapes():
    square = {"shape": "square", "colour": "red", "new_colour": "blue", "change_frame": 7,
              "motion": "left", "appear_frame": 0, "start": [40.0, 30.0], "radius": 5.0}
    circle = {"shape": "circle", "colour": "green", "new_colour": None, "change_frame": None,
              "motion": "still", "appear_frame": 3, "start": [10.0, 10.0], "radius": 5.0}
    truth = {"num_frames": 9, "objects": [square, circle]}
    targets = visual_targets(truth)
    assert targets.shape == (len(TARGETS),)
    colours = list(world.COLOURS)
    assert _target(targets, "count") == 1  # two shapes
    assert _target(targets, "square_colour_start") == 1 + colours.index("red")
    assert _target(targets, "square_colour_end") == 1 + colours.index("blue")
    assert _target(targets, "square_motion") == 1 + world.MOTIONS.index("left")
    assert _target(targets, "square_appears") == 1  # there from the first frame
    assert _target(targets, "square_changes") == 2 + 2  # frame 7 of 9: the last third
    assert _target(targets, "circle_appears") == 2 + 1  # frame 3 of 9: the middle third
    assert _target(targets, "circle_changes") == 1  # never changes
    assert _target(targets, "circle_motion") == 1 + world.MOTIONS.index("still")
    for name, _ in world_attribute_names("triangle"):
        assert _target(targets, name) == 0  # absent
    assert all(0 <= t < classes for t, (_, classes) in zip(targets, TARGETS))


def test_frame_targets_follow_each_shape_colour_and_cell_frame_by_frame():
    # 64 px frames, 4 cells a side: cell = 1 + centre // 16. The square moves left by
    # 0.35 * 64 = 22.4 px over the video and turns blue at frame 7; the circle appears at 3.
    square = {"shape": "square", "colour": "red", "new_colour": "blue", "change_frame": 7,
              "motion": "left", "appear_frame": 0, "start": [40.0, 30.0], "radius": 5.0}
    circle = {"shape": "circle", "colour": "green", "new_colour": None, "change_frame": None,
              "motion": "still", "appear_frame": 3, "start": [10.0, 50.0], "radius": 5.0}
    truth = {"num_frames": 9, "size": 64, "objects": [square, circle]}
    targets = frame_targets(truth)
    assert targets.shape == (9, len(FRAME_TARGETS))
    names = [n for n, _ in FRAME_TARGETS]
    column = {name: targets[:, names.index(name)].tolist() for name in names}
    red, blue, green = (1 + list(world.COLOURS).index(c) for c in ("red", "blue", "green"))
    assert column["square_frame_colour"] == [red] * 7 + [blue] * 2
    assert column["square_frame_x"][0] == 1 + 40 // 16 and column["square_frame_x"][-1] == 2
    assert column["square_frame_y"] == [2] * 9
    assert column["circle_frame_colour"] == [0] * 3 + [green] * 6  # not visible before frame 3
    assert column["circle_frame_x"] == [0] * 3 + [1] * 6
    assert column["circle_frame_y"] == [0] * 3 + [4] * 6
    assert column["triangle_frame_colour"] == [0] * 9  # absent


def world_attribute_names(shape):
    return [(f"{shape}_{name}", c) for name, c in vision_pretrain.SHAPE_ATTRIBUTES]


def test_fresh_videos_are_rendered_world_videos_with_their_targets():
    rng = np.random.default_rng(3)
    frames, targets = vision_pretrain.fresh_videos(rng, 4, 8, 64)
    assert frames.shape == (4, 8, 64, 64, 3) and frames.dtype == np.uint8
    again = np.random.default_rng(3)
    truth = world.sample_truth(again, "fresh", 8, 64, 4)
    np.testing.assert_array_equal(frames[0], render.render_frames(truth))
    np.testing.assert_array_equal(targets["video"][0], visual_targets(truth))
    np.testing.assert_array_equal(targets["frame"][0], frame_targets(truth))


def _tower_config() -> ClipVisionConfig:
    return ClipVisionConfig.from_dict(models.get_config("clip_tiny"))


def test_pretraining_lowers_the_probe_loss_and_caches_the_tower(world_dir, tmp_path,  # noqa: F811
                                                                monkeypatch):
    config = _tower_config()
    cache = str(tmp_path / "tower")
    args = dict(world_dir=world_dir, config=config, num_frames=8, batch_size=8, lr=3e-3, seed=0,
                progress=False)
    params = pretrained_tower(cache, steps=60, **args)
    with open(os.path.join(cache, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["train_loss"] < metrics["first_loss"] - 0.3
    assert metrics["eval_loss"] < metrics["first_loss"] - 0.15  # 4 saved, decoded eval videos
    assert set(metrics["eval_accuracy"]) == {name for name, _ in TARGETS + FRAME_TARGETS}
    assert {"patch_embedding", "layers"} <= set(params)  # the tower alone, as VideoLLM names it

    def no_training(*a, **k):
        raise AssertionError("the cached tower should have been reused")

    monkeypatch.setattr(vision_pretrain, "pretrain_vision", no_training)
    again = pretrained_tower(cache, steps=60, **args)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(params), again)
    with pytest.raises(AssertionError, match="reused"):  # other settings: trained again
        pretrained_tower(cache, steps=61, **args)
