"""Index-based input pipeline: step -> example indices -> tokenised, padded, batched arrays.

The order is a pure function of (seed, step): example positions run as an endless stream of
epochs, each a seeded permutation of the split, and step k takes positions [k*B, (k+1)*B). So
resuming at step k is a seek, and every process computes the same global batch and keeps its own
slice of it (`process_index`), which `global_batch` assembles into `jax.Array`s sharded over the
mesh's batch axes.

Batches (numpy, static shapes, B = the process's rows):
- instruction: input_ids, attention_mask, labels [B, L] (right-padded; labels -100 except on
  assistant answers), frames uint8 [B, T, S, S, 3], has_video bool [B]
- prompt, qa: the same keys with left-padded prompts ending in "ASSISTANT:" and labels all -100
- preference: input_ids, attention_mask [B, 2, L] (right-padded; the question, response 1 or 2,
  then the reward model's evaluation prompt), response_mask [B, 2, L] (1 on the response's
  tokens), preference int32 [B] (1 or 2), frames, has_video
Every batch also has index int32 [B] (the example's record index, -1 for filler) and valid
bool [B] (False only for filler rows past the end of a non-repeating evaluation pass).
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from rlaif_jax.data import conversation
from rlaif_jax.data.built import BuiltData, decode_record
from rlaif_jax.data.video import sample_indices
from rlaif_jax.parallel.sharding import global_batch

# A split's token rows stay in memory (a batch is then a lookup, not a re-read and re-tokenising
# of its items every epoch) while they take at most this many bytes; a larger split tokenises
# each batch's items as it is made. A row's Python objects count ROW_OVERHEAD_BYTES beside its
# token arrays.
TOKEN_CACHE_BYTES = 512 * 2**20
ROW_OVERHEAD_BYTES = 512
# Items tokenised in one batched tokenizer call while a split is opened (bounds the memory of
# rows that are not kept).
TOKENIZE_CHUNK = 4096


def _turns(record: dict) -> list[dict]:
    return [{"from": r, "value": v} for r, v in zip(record["roles"], record["values"])]


def _or_too_long(make):
    """make(), or the TooLong it raised: an item that does not fit is skipped, not fatal."""
    try:
        return make()
    except conversation.TooLong as error:
        return error


def _array_bytes(row) -> int:
    """Bytes of a token row's arrays (a Tokenized, an array, or a tuple of them)."""
    if isinstance(row, np.ndarray):
        return row.nbytes
    if isinstance(row, conversation.Tokenized):
        row = (row.input_ids, row.labels)
    return sum(_array_bytes(part) for part in row)


def _pad(rows: Sequence[np.ndarray], length: int, value: int, left: bool) -> np.ndarray:
    out = np.full((len(rows), length), value, np.int32)
    for i, row in enumerate(rows):
        if left:
            out[i, length - len(row):] = row
        else:
            out[i, :len(row)] = row
    return out


class Pipeline:
    """Batches of one split of a build. `batch_size` is the global batch (all processes)."""

    def __init__(self, data_dir: str, split: str, tokenizer, batch_size: int, max_length: int,
                 seed: int = 0, *, shuffle: bool = True, num_frames: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 qa_question: str = "question", prefetch: int = 2, workers: int = 2,
                 token_cache_bytes: int = TOKEN_CACHE_BYTES):
        self.data = BuiltData(data_dir)
        self.kind = self.data.kind
        self.split = split
        self.tokenizer = tokenizer
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.shuffle = shuffle
        self.num_frames = num_frames or self.data.num_frames
        self.size = self.data.size
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by {self.process_count} "
                             "processes")
        self.local_batch_size = batch_size // self.process_count
        if qa_question not in ("question", "question_2"):
            raise ValueError("qa_question must be 'question' or 'question_2'")
        self.qa_question = qa_question
        self.prefetch, self.workers = prefetch, workers
        self.token_cache_bytes = token_cache_bytes
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._items = self.data.items(split)
        self.skipped: collections.Counter = collections.Counter()
        self._usable = self._find_usable()
        if not len(self._usable):
            raise ValueError(f"no usable examples in split {split!r} of {data_dir} "
                             f"(skipped: {dict(self.skipped)})")

    # ------------------------------------------------------------------ order

    def _find_usable(self) -> np.ndarray:
        """Record indices of items that fit max_length; the others are dropped and counted
        (prompts longer than max_length, an `<image>` that truncation would cut).

        Every item is tokenised here, in batched tokenizer calls; the rows are kept
        (`self._token_rows`, by record index) while they fit in `token_cache_bytes`. The
        records' video ids (and preferences) are kept whatever the size: a batch then reads
        no record when its rows are kept.
        """
        records = self.data.item_records(self.split)
        self._video_ids = np.array([int(r["video"]) for r in records], np.int64)
        if self.kind == "preference":
            self._preferences = np.array([int(r.get("preference", 1)) for r in records],
                                         np.int32)
        self.num_truncated = 0  # instruction items kept but cut at the end
        usable, kept, size = [], [None] * len(records), 0
        for start in range(0, len(records), TOKENIZE_CHUNK):
            rows = self._tokenize(records[start:start + TOKENIZE_CHUNK])
            for index, row in enumerate(rows, start):
                if isinstance(row, conversation.TooLong):
                    self.skipped[type(row).__name__] += 1
                    continue
                usable.append(index)
                self.num_truncated += int(getattr(row, "truncated", False))
                if kept is not None:
                    kept[index] = row
                    size += ROW_OVERHEAD_BYTES + _array_bytes(row)
                    if size > self.token_cache_bytes:
                        kept = None
        self._token_rows = kept
        return np.asarray(usable, np.int64)

    @property
    def num_examples(self) -> int:
        return len(self._usable)

    @property
    def steps_per_epoch(self) -> int:
        """Full batches in one pass (training); an evaluation pass (shuffle=False) also counts
        its last, partly filled batch."""
        if self.shuffle:
            return max(1, self.num_examples // self.batch_size)
        return -(-self.num_examples // self.batch_size)

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def global_indices(self, step: int) -> np.ndarray:
        """Record indices of the whole global batch of `step` (-1 for filler rows)."""
        positions = step * self.batch_size + np.arange(self.batch_size)
        n = self.num_examples
        if not self.shuffle:
            result = np.full(self.batch_size, -1, np.int64)
            inside = positions < n
            result[inside] = self._usable[positions[inside]]
            return result
        epochs, offsets = positions // n, positions % n
        order = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            order[chosen] = self._permutation(int(epoch))[offsets[chosen]]
        return self._usable[order]

    def local_indices(self, step: int) -> np.ndarray:
        """This process's contiguous slice of the global batch."""
        start = self.process_index * self.local_batch_size
        return self.global_indices(step)[start:start + self.local_batch_size]

    # ------------------------------------------------------------------ rows

    def _prompt_turn(self, record: dict) -> dict:
        if self.kind == "qa":
            return conversation.video_question(record[self.qa_question])
        return conversation.first_human_turn(_turns(record))

    def _tokenize(self, records: Sequence[dict]) -> list:
        """Tokens of each record, or the TooLong that keeps it out: a Tokenized (instruction),
        the prompt's ids (prompt, qa), or the two reward-model rows (preference), each
        (ids, response mask)."""
        L = self.max_length
        if self.kind == "instruction":
            image_id = conversation.image_token_id(self.tokenizer)
            full = conversation.tokenize_conversations([_turns(r) for r in records],
                                                       self.tokenizer)
            return [_or_too_long(functools.partial(conversation.truncate, row, L, image_id))
                    for row in full]
        if self.kind in ("prompt", "qa"):
            prompts_ids = conversation.tokenize_prompts(
                [self._prompt_turn(r) for r in records], self.tokenizer)
            return [ids if len(ids) <= L else conversation.TooLong("prompt longer than max_length")
                    for ids in prompts_ids]
        if self.kind == "preference":
            return [_or_too_long(functools.partial(self._reward_model_rows, r)) for r in records]
        raise ValueError(f"unknown kind {self.kind!r}")

    def _reward_model_rows(self, record: dict) -> tuple:
        """((ids, response mask) of output_1, (ids, response mask) of output_2)."""
        question = conversation.first_human_turn(_turns(record))
        return tuple(conversation.reward_model_row(
            question, record[key], self.tokenizer, self.max_length)
            for key in ("output_1", "output_2"))

    def _rows(self, indices: np.ndarray) -> list:
        """Token rows of usable records: kept ones, else tokenised now."""
        if self._token_rows is not None:
            return [self._token_rows[i] for i in indices]
        return self._tokenize([self.record(i) for i in indices])

    def record(self, index: int) -> dict:
        """The stored item (texts as str): eval looks answers up by a batch's `index`."""
        return decode_record(self._items[int(index)])

    def _frames(self, video_ids: np.ndarray) -> np.ndarray:
        frames = np.zeros((len(video_ids), self.num_frames, self.size, self.size, 3), np.uint8)
        wanted = sorted({int(v) for v in video_ids if v >= 0})
        if not wanted:
            return frames
        # One read a video: array_record's __getitems__ starts a thread pool every call, which
        # costs more than it saves for the few records of a batch.
        stored = {video_id: self.data.video_frames(video_id) for video_id in wanted}
        for row, video_id in enumerate(video_ids):
            if video_id < 0:
                continue
            clip = stored[int(video_id)]
            if len(clip) != self.num_frames:  # fewer frames than stored: resample by linspace
                clip = clip[sample_indices(len(clip), self.num_frames)]
            frames[row] = clip
        return frames

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch `step`, as numpy arrays of static shapes."""
        indices = self.local_indices(step)
        valid = indices >= 0
        video_ids = np.where(valid, self._video_ids[np.maximum(indices, 0)], -1)
        tokens = iter(self._rows(indices[valid]))
        batch = {"frames": self._frames(video_ids), "has_video": video_ids >= 0,
                 "index": indices.astype(np.int32), "valid": valid}
        L, pad = self.max_length, self.pad_id
        ignore = conversation.IGNORE_INDEX
        if self.kind == "instruction":
            empty = conversation.Tokenized(np.zeros(0, np.int32), np.zeros(0, np.int32))
            rows = [next(tokens) if ok else empty for ok in valid]
            batch["input_ids"] = _pad([r.input_ids for r in rows], L, pad, left=False)
            batch["labels"] = _pad([r.labels for r in rows], L, ignore, left=False)
            batch["attention_mask"] = _pad([np.ones_like(r.input_ids) for r in rows], L, 0,
                                           left=False)
        elif self.kind in ("prompt", "qa"):
            rows = [next(tokens) if ok else np.zeros(0, np.int32) for ok in valid]
            batch["input_ids"] = _pad(rows, L, pad, left=True)
            batch["attention_mask"] = _pad([np.ones_like(r) for r in rows], L, 0, left=True)
            batch["labels"] = np.full((len(rows), L), ignore, np.int32)
        else:  # preference
            empty = (np.zeros(0, np.int32), np.zeros(0, np.int32))
            pairs = [next(tokens) if ok else (empty, empty) for ok in valid]

            def stacked(part, fill, of=lambda x: x):  # [B, 2, L] of candidate k's part
                return np.stack([_pad([of(p[k][part]) for p in pairs], L, fill, left=False)
                                 for k in (0, 1)], axis=1)

            batch["input_ids"] = stacked(0, pad)
            batch["attention_mask"] = stacked(0, 0, np.ones_like)
            batch["response_mask"] = stacked(1, 0)
            batch["preference"] = np.where(valid, self._preferences[np.maximum(indices, 0)], 1
                                           ).astype(np.int32)
        return batch

    # ------------------------------------------------------------------ device arrays, iteration

    def global_batch(self, step: int, mesh: Mesh,
                     batch_axes: Sequence[str] | str = ("data", "fsdp")) -> dict[str, jax.Array]:
        return to_global_arrays(self.batch(step), mesh, batch_axes, self.batch_size)

    def iterate(self, start_step: int = 0, num_steps: int | None = None
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch) from `start_step`, `prefetch` batches prepared ahead by worker threads."""
        return prefetched(self.batch, start_step, num_steps, self.prefetch, self.workers)


def to_global_arrays(local_batch: dict[str, np.ndarray], mesh: Mesh,
                     batch_axes: Sequence[str] | str, global_batch_size: int
                     ) -> dict[str, jax.Array]:
    """Each process's rows -> global arrays whose first axis is sharded over `batch_axes`."""
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return global_batch(local_batch, mesh, global_batch_size, axes)


def prefetched(make_batch, start_step: int, num_steps: int | None, prefetch: int, workers: int):
    """Runs make_batch(step) for the next `prefetch` steps in threads; yields in step order."""
    end = None if num_steps is None else start_step + num_steps
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        pending = collections.deque()
        next_step = start_step
        while True:
            while len(pending) < max(1, prefetch) and (end is None or next_step < end):
                pending.append((next_step, pool.submit(make_batch, next_step)))
                next_step += 1
            if not pending:
                return
            step, future = pending.popleft()
            yield step, future.result()


def phase_splits(phase: str) -> list[str]:
    """The splits a curriculum phase takes its steps from, in turn: "short+long" -> [short, long]."""
    splits = [s.strip() for s in str(phase).split("+")]
    if not all(splits):
        raise ValueError(f"curriculum phase {phase!r}: empty split name")
    return splits


def _turns_taken(turns: list[str], split: str, steps: int) -> int:
    """Steps that `split` gets in a phase of `steps` steps taking turns over `turns`."""
    rounds, rest = divmod(steps, len(turns))
    return rounds * turns.count(split) + turns[:rest].count(split)


class Curriculum:
    """A schedule of splits, e.g. [("short", 300), ("long", 700)]: global step -> (split, step
    within it). Each split keeps its own seeded order, so resuming anywhere is still a seek.

    A phase may interleave splits: "short+long" takes its steps from short, long, short, ... in
    turn (a split named twice, "short+short+long", gets twice the steps). Each step is still one
    split's batch, so every split keeps its own static shape and no row is padded to another
    split's length; a later phase of a split continues its stream where the earlier one left it.
    """

    def __init__(self, data_dir: str, schedule: Sequence[tuple[str, int]], tokenizer,
                 batch_size: int, max_length: int | dict[str, int], seed: int = 0,
                 **pipeline_kwargs):
        """`max_length` may differ by split ({split: length}): short answers need far fewer
        tokens than descriptions, and each split's batches keep their own static shape."""
        if not schedule or any(steps <= 0 for _, steps in schedule):
            raise ValueError("a curriculum needs at least one stage, each of positive steps")
        self.schedule = [(phase, int(steps)) for phase, steps in schedule]
        splits = list(dict.fromkeys(s for phase, _ in self.schedule for s in phase_splits(phase)))
        lengths = max_length if isinstance(max_length, dict) else {
            split: max_length for split in splits}
        missing = sorted(set(splits) - set(lengths))
        if missing:
            raise ValueError(f"no max_length for splits {missing}")
        self.pipelines = {split: Pipeline(data_dir, split, tokenizer, batch_size, lengths[split],
                                          seed, **pipeline_kwargs)
                          for split in splits}
        self.batch_size = batch_size
        self.prefetch = pipeline_kwargs.get("prefetch", 2)
        self.workers = pipeline_kwargs.get("workers", 2)
        self.total_steps = sum(steps for _, steps in self.schedule)

    def locate(self, step: int) -> tuple[str, int]:
        """(split, step within the split's own stream) of a global step."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the curriculum's {self.total_steps} steps")
        seen = collections.Counter()  # a split may come back later: continue its stream
        start = 0
        for phase, steps in self.schedule:
            turns = phase_splits(phase)
            if step < start + steps:
                within = step - start
                split = turns[within % len(turns)]
                return split, seen[split] + _turns_taken(turns, split, within)
            for split in set(turns):
                seen[split] += _turns_taken(turns, split, steps)
            start += steps
        raise AssertionError("unreachable")

    def batch(self, step: int) -> dict[str, np.ndarray]:
        split, local_step = self.locate(step)
        return self.pipelines[split].batch(local_step)

    def global_batch(self, step: int, mesh: Mesh,
                     batch_axes: Sequence[str] | str = ("data", "fsdp")) -> dict[str, jax.Array]:
        return to_global_arrays(self.batch(step), mesh, batch_axes, self.batch_size)

    def iterate(self, start_step: int = 0, num_steps: int | None = None):
        remaining = self.total_steps - start_step
        num_steps = remaining if num_steps is None else min(num_steps, remaining)
        return prefetched(self.batch, start_step, num_steps, self.prefetch, self.workers)
