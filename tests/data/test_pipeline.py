"""The index-based pipeline: batch layout, padding, process slices, resume, sharding, curriculum."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rlaif_jax.data import conversation, prompts
from rlaif_jax.data.pipeline import Curriculum, Pipeline
from rlaif_jax.data.video import sample_indices

DESIGN_KEYS = {"input_ids": np.int32, "attention_mask": np.int32, "labels": np.int32,
               "frames": np.uint8, "has_video": np.bool_}


def _check_layout(batch, rows, length, frames=8, size=64):
    for key, dtype in DESIGN_KEYS.items():
        assert batch[key].dtype == dtype, key
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (rows, length), key
    assert batch["frames"].shape == (rows, frames, size, size, 3)
    assert batch["has_video"].shape == (rows,)


def test_training_batch(instruction_data, world_tokenizer):  # noqa: F811
    pipe = Pipeline(instruction_data, "short", world_tokenizer, batch_size=8, max_length=96)
    batch = pipe.batch(0)
    _check_layout(batch, 8, 96)
    assert batch["has_video"].all() and batch["valid"].all()
    mask = batch["attention_mask"].astype(bool)
    for row in range(8):
        real = mask[row].sum()
        assert mask[row, :real].all() and not mask[row, real:].any()  # right-padded
        assert (batch["input_ids"][row, real:] == world_tokenizer.pad_token_id).all()
        labels = batch["labels"][row]
        assert (labels[~mask[row]] == conversation.IGNORE_INDEX).all()
        record = pipe.record(batch["index"][row])
        trained = labels[labels != conversation.IGNORE_INDEX]
        assert world_tokenizer.decode(trained).strip() == record["values"][1] + "</s>"
        stored = pipe.data.frames[int(record["video"])]["frames"]
        np.testing.assert_array_equal(batch["frames"][row], stored)


def test_text_only_rows_have_no_video(mixed_data, world_tokenizer):  # noqa: F811
    pipe = Pipeline(mixed_data, "train", world_tokenizer, batch_size=4, max_length=80,
                    shuffle=False)
    batch = pipe.batch(0)
    ids = [pipe.record(i)["id"] for i in batch["index"]]
    text_row = ids.index("text_only")
    assert not batch["has_video"][text_row] and batch["has_video"].sum() == 3
    assert not batch["frames"][text_row].any()
    image_id = conversation.image_token_id(world_tokenizer)
    assert image_id not in batch["input_ids"][text_row]
    assert [(row == image_id).sum() for row in batch["input_ids"]].count(1) == 3


def test_prompt_batch_is_left_padded_and_long_prompts_are_dropped(prompt_data, world_tokenizer):  # noqa: F811
    full = Pipeline(prompt_data, "train", world_tokenizer, batch_size=4, max_length=256)
    batch = full.batch(0)
    _check_layout(batch, 4, 256)
    assert (batch["labels"] == conversation.IGNORE_INDEX).all()
    mask = batch["attention_mask"].astype(bool)
    for row in range(4):
        real = mask[row].sum()
        assert mask[row, -real:].all() and not mask[row, :-real].any()  # left-padded
        text = world_tokenizer.decode(batch["input_ids"][row][mask[row]])
        assert text.endswith("ASSISTANT:")
    lengths = [len(conversation.tokenize_prompt(
        conversation.first_human_turn([{"from": r, "value": v} for r, v in
                                       zip(full.record(i)["roles"], full.record(i)["values"])]),
        world_tokenizer)) for i in range(full.num_examples)]
    limit = int(np.median(lengths))
    short = Pipeline(prompt_data, "train", world_tokenizer, batch_size=4, max_length=limit)
    too_long = sum(n > limit for n in lengths)
    assert too_long > 0 and short.skipped["TooLong"] == too_long
    assert short.num_examples == full.num_examples - too_long


def test_preference_batch(preference_data, world_tokenizer):  # noqa: F811
    pipe = Pipeline(preference_data, "train", world_tokenizer, batch_size=4, max_length=160)
    batch = pipe.batch(0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 2, 160)
    assert set(batch["preference"]) <= {1, 2} and batch["frames"].shape == (4, 8, 64, 64, 3)
    _, lead = prompts.rm_evaluation_prompt()
    for row in range(4):
        record = pipe.record(batch["index"][row])
        assert batch["preference"][row] == record["preference"]
        for k in range(2):
            ids = batch["input_ids"][row, k][batch["attention_mask"][row, k] == 1]
            text = world_tokenizer.decode(ids)
            assert text.endswith(lead) and record[f"output_{k + 1}"].strip()[:20] in text


def test_qa_batches_and_evaluation_pass(qa_data, world_tokenizer):  # noqa: F811
    pipe = Pipeline(qa_data, "consistency", world_tokenizer, batch_size=3, max_length=96,
                    shuffle=False, qa_question="question_2")
    seen = []
    for step in range(pipe.steps_per_epoch):
        batch = pipe.batch(step)
        for row in np.flatnonzero(batch["valid"]):
            record = pipe.record(batch["index"][row])
            text = world_tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] == 1])
            assert record["question_2"] in text
            seen.append(int(batch["index"][row]))
        assert (batch["index"][~batch["valid"]] == -1).all()
    assert sorted(seen) == list(range(pipe.num_examples))  # each item exactly once


def test_two_processes_get_disjoint_slices_covering_the_data(instruction_data, world_tokenizer):  # noqa: F811
    kwargs = dict(batch_size=8, max_length=96, seed=3, process_count=2)
    first = Pipeline(instruction_data, "short", world_tokenizer, process_index=0, **kwargs)
    second = Pipeline(instruction_data, "short", world_tokenizer, process_index=1, **kwargs)
    n = first.num_examples
    steps = -(-n // 8)
    seen = []
    for step in range(steps):
        a, b = first.local_indices(step), second.local_indices(step)
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        np.testing.assert_array_equal(np.concatenate([a, b]), first.global_indices(step))
        np.testing.assert_array_equal(first.batch(step)["index"], a)
        seen.extend(a)
        seen.extend(b)
    epoch = [int(i) for s in range(steps) for i in first.global_indices(s)][:n]
    assert sorted(epoch) == list(range(n))  # the first epoch is a permutation of the data
    assert set(seen) == set(range(n))


def test_resume_at_step_k_is_a_seek(instruction_data, world_tokenizer):  # noqa: F811
    kwargs = dict(batch_size=4, max_length=96, seed=11)
    uninterrupted = list(Pipeline(instruction_data, "short", world_tokenizer, **kwargs).iterate(0, 9))
    resumed = list(Pipeline(instruction_data, "short", world_tokenizer, **kwargs).iterate(6, 3))
    assert [s for s, _ in resumed] == [6, 7, 8]
    for (step, expected), (_, got) in zip(uninterrupted[6:], resumed):
        assert expected.keys() == got.keys()
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key], err_msg=f"{key} step {step}")
    other_seed = Pipeline(instruction_data, "short", world_tokenizer, batch_size=4,
                          max_length=96, seed=12)
    assert not np.array_equal(other_seed.batch(6)["index"], resumed[0][1]["index"])


def test_global_batch_is_sharded_over_the_batch_axes(instruction_data, world_tokenizer):  # noqa: F811
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    pipe = Pipeline(instruction_data, "short", world_tokenizer, batch_size=8, max_length=96)
    arrays = pipe.global_batch(2, mesh, ("data", "fsdp"))
    local = pipe.batch(2)
    for key, value in arrays.items():
        assert value.shape == local[key].shape
        assert value.sharding.spec == PartitionSpec(("data", "fsdp"))
        assert len(value.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(value), local[key])
    assert arrays["frames"].addressable_shards[0].data.shape == (1, 8, 64, 64, 3)


def test_curriculum_is_a_schedule_of_splits(instruction_data, world_tokenizer):  # noqa: F811
    kwargs = dict(batch_size=4, max_length=128, seed=0)
    curriculum = Curriculum(instruction_data, [("short", 3), ("long", 2)], world_tokenizer,
                            **kwargs)
    short = Pipeline(instruction_data, "short", world_tokenizer, **kwargs)
    long = Pipeline(instruction_data, "long", world_tokenizer, **kwargs)
    assert curriculum.total_steps == 5
    assert [curriculum.locate(s) for s in range(5)] == [("short", 0), ("short", 1), ("short", 2),
                                                         ("long", 0), ("long", 1)]
    np.testing.assert_array_equal(curriculum.batch(1)["input_ids"], short.batch(1)["input_ids"])
    np.testing.assert_array_equal(curriculum.batch(4)["input_ids"], long.batch(1)["input_ids"])
    assert [s for s, _ in curriculum.iterate(2)] == [2, 3, 4]
    with pytest.raises(IndexError):
        curriculum.locate(5)


def test_curriculum_phase_interleaves_splits_and_continues_their_streams(
        instruction_data, world_tokenizer):  # noqa: F811
    kwargs = dict(batch_size=4, max_length={"short": 64, "long": 128}, seed=0)
    schedule = [("short", 2), ("short+short+long", 5), ("long+short", 3)]
    curriculum = Curriculum(instruction_data, schedule, world_tokenizer, **kwargs)
    assert [curriculum.locate(s) for s in range(10)] == [
        ("short", 0), ("short", 1),
        ("short", 2), ("short", 3), ("long", 0), ("short", 4), ("short", 5),
        ("long", 1), ("short", 6), ("long", 2)]
    # Each step is one split's batch at that split's own length: nothing padded to the other's.
    assert curriculum.batch(4)["input_ids"].shape[1] > curriculum.batch(3)["input_ids"].shape[1]
    short = Pipeline(instruction_data, "short", world_tokenizer, 4, 64, seed=0)
    np.testing.assert_array_equal(curriculum.batch(8)["input_ids"], short.batch(6)["input_ids"])
    with pytest.raises(ValueError, match="empty split"):
        Curriculum(instruction_data, [("short+", 2)], world_tokenizer, **kwargs)


def test_long_items_are_truncated_or_dropped_and_counted(instruction_data, world_tokenizer):  # noqa: F811
    full = Pipeline(instruction_data, "long", world_tokenizer, batch_size=2, max_length=512)
    assert full.num_truncated == 0 and not full.skipped
    cut = Pipeline(instruction_data, "long", world_tokenizer, batch_size=2, max_length=40)
    assert cut.num_examples == full.num_examples and cut.num_truncated > 0
    batch = cut.batch(0)
    image_id = conversation.image_token_id(world_tokenizer)
    assert ((batch["input_ids"] == image_id).sum(axis=1) == 1).all()  # never cut away
    # Every row's placeholder sits at the same token (after the template's opening):
    # a max_length that ends before it leaves nothing usable.
    placeholder = int(np.flatnonzero(batch["input_ids"][0] == image_id)[0])
    tiny = Pipeline(instruction_data, "long", world_tokenizer, batch_size=2,
                    max_length=placeholder + 2)
    assert not tiny.skipped
    with pytest.raises(ValueError, match="no usable examples"):
        Pipeline(instruction_data, "long", world_tokenizer, batch_size=2, max_length=placeholder)


def test_fewer_frames_than_stored_are_resampled(instruction_data, world_tokenizer):  # noqa: F811
    pipe = Pipeline(instruction_data, "short", world_tokenizer, batch_size=2, max_length=96,
                    num_frames=3)
    batch = pipe.batch(0)
    assert batch["frames"].shape == (2, 3, 64, 64, 3)
    stored = pipe.data.frames[int(pipe.record(batch["index"][0])["video"])]["frames"]
    np.testing.assert_array_equal(batch["frames"][0], stored[sample_indices(8, 3)])


def test_kept_token_rows_give_the_batches_of_tokenising_each_batch(
        instruction_data, prompt_data, preference_data, world_tokenizer):  # noqa: F811
    """A split's token rows are kept when it is opened; with no room for them each batch
    tokenises its own items: both give the same batches, skip counts and truncations."""
    for data, split, length in ((instruction_data, "long", 40), (instruction_data, "short", 96),
                                (prompt_data, "train", 60), (preference_data, "train", 120)):
        kept = Pipeline(data, split, world_tokenizer, batch_size=4, max_length=length, seed=1)
        fresh = Pipeline(data, split, world_tokenizer, batch_size=4, max_length=length, seed=1,
                         token_cache_bytes=0)
        assert kept._token_rows is not None and fresh._token_rows is None
        assert (kept.num_examples, kept.skipped, kept.num_truncated) == (
            fresh.num_examples, fresh.skipped, fresh.num_truncated)
        for step in range(kept.steps_per_epoch + 1):  # into the next epoch
            ours, theirs = kept.batch(step), fresh.batch(step)
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert ours[key].dtype == theirs[key].dtype, key
                np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
