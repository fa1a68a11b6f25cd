"""Stop-and-save on SIGTERM, with every host agreeing on the step.

A cluster preempts by sending SIGTERM to every process, but not at the same instant: if each host
saved at the step it noticed the signal, the hosts would write different steps. The handler only
raises a local flag; at each step boundary the hosts all-gather their flags and all stop at the
first step where any of them has seen it.
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatch:
    def __init__(self, signals=(signal.SIGTERM,)):
        self.received = False
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def should_stop(self) -> bool:
        """Collective when there are several processes: every process must call it each step."""
        if jax.process_count() == 1:
            return self.received
        flags = multihost_utils.process_allgather(np.asarray(self.received, np.int32))
        return bool(np.asarray(flags).any())

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
