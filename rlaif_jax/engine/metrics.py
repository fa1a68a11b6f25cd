"""Run metrics: one JSON object a line in metrics.jsonl, and TensorBoard event files.

Keys are namespaced ('train/loss', 'eval/exact_match', 'rollout/...'); every line has `step` and
`stage`. Only process 0 writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Optional

from rlaif_jax.workdir.files import read_jsonl


class MetricsWriter:
    def __init__(self, directory: str, stage: str, enabled: bool = True, tensorboard: bool = True):
        self.stage, self.enabled = stage, enabled
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(directory, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter  # lazy: optional (log.tensorboard)
                self._tb = SummaryWriter(logdir=os.path.join(directory, "tensorboard"))

    def write(self, step: int, values: Mapping[str, float]):
        if not self.enabled:
            return
        record = {"step": int(step), "stage": self.stage, "time": time.time()}
        for key, value in values.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
            if self._tb is not None:
                self._tb.add_scalar(key, value, int(step))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str, key: Optional[str] = None) -> list[dict]:
    """The records of a metrics.jsonl (those holding `key`, if given), in file order; a line
    cut short by a crash is left out."""
    records, _ = read_jsonl(path)
    return [r for r in records if key is None or key in r]
