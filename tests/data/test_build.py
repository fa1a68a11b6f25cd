"""tfds builds: every kind of the reference JSON, bad input skipped and counted, frames once."""
import json
import os

import numpy as np

from tests.support import MIXED_SKIPS, write_mixed_items
from rlaif_jax.data import build as build_module
from rlaif_jax.data import video
from rlaif_jax.data.built import BuiltData, decode_record


def _count(world_dir, name):
    with open(os.path.join(world_dir, name)) as f:
        return len(json.load(f))


def test_reference_json_of_every_kind_builds_completely(
        world_dir, instruction_data, preference_data, prompt_data, qa_data):  # noqa: F811
    expected = {
        instruction_data: {"short": "sft_short.json", "long": "sft_long.json"},
        preference_data: {"train": "preferences_oracle.json"},
        prompt_data: {"train": "ppo_prompts.json"},
        qa_data: {"qa": "eval_qa.json", "consistency": "eval_consistency.json"},
    }
    for data_dir, splits in expected.items():
        built = BuiltData(data_dir)
        assert built.info["skipped_total"] == {}
        for split, name in splits.items():
            assert built.splits[split] == len(built.items(split)) == _count(world_dir, name)
    qa = BuiltData(qa_data)
    record = qa.items("consistency")[0]
    assert record["format"] == b"consistency" and record["question_2"]


def test_frames_are_stored_once_per_video_and_match_decoding(world_dir, instruction_data):  # noqa: F811
    built = BuiltData(instruction_data)
    short = built.items("short")
    video_ids = {int(short[i]["video"]) for i in range(len(short))}
    assert len(video_ids) < len(short)  # items share videos
    assert built.info["videos"]["total"] == len(built.frames)
    record = short[0]
    stored = built.frames[int(record["video"])]
    source = stored["source"].decode()
    np.testing.assert_array_equal(stored["frames"], video.load_frames(source, 8, 64))
    assert source.endswith(".mp4") and stored["ok"]


def test_records_read_from_raw_examples_equal_tfds_decoding(
        instruction_data, preference_data, prompt_data, qa_data, mixed_data):  # noqa: F811
    """item_records / video_frames skip tfds's per-feature decoding and give the same values,
    of the same types (mixed_data has failed videos: zero frames)."""
    def typed(record):
        return {key: (type(value), value) for key, value in record.items()}

    for data_dir in (instruction_data, preference_data, prompt_data, qa_data, mixed_data):
        built = BuiltData(data_dir)
        for split in built.splits:
            items = built.items(split)
            assert [typed(r) for r in built.item_records(split)] == [
                typed(decode_record(items[i])) for i in range(len(items))]
        for video_id in range(len(built.frames)):
            stored, fast = built.frames[video_id]["frames"], built.video_frames(video_id)
            assert (fast.dtype, fast.shape) == (stored.dtype, stored.shape)
            np.testing.assert_array_equal(fast, stored)


def test_bad_items_are_skipped_and_counted_good_ones_kept(mixed_data):  # noqa: F811
    built = BuiltData(mixed_data)
    assert built.info["skipped"]["train"] == MIXED_SKIPS
    items = built.items("train")
    kept = {items[i]["id"].decode(): int(items[i]["video"]) for i in range(len(items))}
    assert set(kept) == {"good_1", "good_2", "folder", "text_only"}
    assert kept["good_1"] == kept["good_2"]  # one decoded copy for both
    assert kept["text_only"] == -1
    folder_frames = built.frames[kept["folder"]]["frames"]
    file_frames = built.frames[kept["good_1"]]["frames"]
    np.testing.assert_array_equal(folder_frames, file_frames)
    # Decoded: good.mp4, the folder and the three broken files (missing one included).
    assert built.info["videos"] == {"total": 5, "ok": 2, "decoded_by": {"decord": 1, "frames": 1}}


def test_cli_prints_and_writes_counts(world_dir, tmp_path, capsys):  # noqa: F811
    json_path = write_mixed_items(world_dir, str(tmp_path / "root"))
    out = str(tmp_path / "data")
    build_module.main(["--kind", "instruction", "--json", f"mixed={json_path}",
                       "--video_root", str(tmp_path / "root"), "--out", out, "--size", "32",
                       "--frames", "4"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["built"] == {"mixed": 4}
    assert printed["skipped"] == {"mixed": MIXED_SKIPS}
    with open(os.path.join(out, "build.json")) as f:
        assert json.load(f)["skipped"] == {"mixed": MIXED_SKIPS}
    assert BuiltData(out).frames[0]["frames"].shape == (4, 32, 32, 3)
