"""A tiny text-only SFT task (reverse a token string) that exercises the training engine alone.

Rows are in the batch format of docs/method.md (right-padded, labels -100 outside the answer) and
index-based: example i is a pure function of (seed, split, i), so `batch(step)` is a seek. It
lets the loop, checkpointing and resume be tested in seconds with a text LLaMA and no videos.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

IGNORE_INDEX = -100
PAD, BOS, EOS, SEP = 0, 1, 2, 3
FIRST_SYMBOL = 4


@dataclasses.dataclass
class ReverseTask:
    batch_size: int  # global rows a step
    length: int = 4  # symbols to reverse
    symbols: int = 8
    seed: int = 0
    split: str = "train"

    @property
    def seq_len(self) -> int:
        return 2 * self.length + 4  # BOS, symbols, SEP, reversed, EOS, one pad

    @property
    def vocab_needed(self) -> int:
        return FIRST_SYMBOL + self.symbols

    def example(self, index: int) -> dict:
        split_id = {"train": 0, "eval": 1}[self.split]
        rng = np.random.default_rng([self.seed, split_id, index])
        symbols = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + self.symbols, self.length)
        ids = np.concatenate([[BOS], symbols, [SEP], symbols[::-1], [EOS]]).astype(np.int32)
        labels = np.full_like(ids, IGNORE_INDEX)
        answer_start = self.length + 2
        labels[answer_start:] = ids[answer_start:]
        pad = self.seq_len - len(ids)
        return {"input_ids": np.pad(ids, (0, pad)),
                "attention_mask": np.pad(np.ones_like(ids), (0, pad)),
                "labels": np.pad(labels, (0, pad), constant_values=IGNORE_INDEX)}

    def rows(self, indices) -> dict:
        examples = [self.example(int(i)) for i in indices]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def batch(self, step: int, process_index: Optional[int] = None,
              process_count: Optional[int] = None) -> dict:
        """This process's rows of step `step` (by default the running process's share)."""
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if self.batch_size % process_count:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by "
                             f"{process_count} processes")
        per_process = self.batch_size // process_count
        first = step * self.batch_size + process_index * per_process
        return self.rows(range(first, first + per_process))
