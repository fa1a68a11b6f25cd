"""Where a train step's time goes: our XLA program (jax.profiler) and the PyTorch one
(torch.profiler), each summed into a few named parts.

Ours: the profiler's trace events of the compiled program's thunks are mapped back to the HLO
instruction they ran (`compiled.as_text()`), and that instruction's `op_name` (the JAX call
stack: module scopes like `layers/self_attn/q_proj`, `jvp` for the forward, `transpose(jvp)` for
the backward) names its part. Theirs: aten ops by self time, matmuls split by whether the
vocabulary is one of their dimensions (the LM head) or not.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

# First match wins: (part, regex over the op_name).
JAX_PARTS = (
    ("vision tower", r"/vision/"),
    ("projector", r"/projector/"),
    ("lm head", r"lm_head|Llama\.logits"),
    ("attention projections", r"self_attn/(q|k|v|o)_proj"),
    ("attention scores/softmax/rope", r"self_attn"),
    ("mlp", r"/mlp/"),
    ("norms", r"layernorm|/norm/|/norm\b"),
    ("embedding", r"embed"),
    ("scanned-layer plumbing", r"while/body"),
    ("loss", r"jvp|take_along_axis|logsumexp|log_softmax"),
    ("optimizer", r"."),
)

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', re.M)


def _op_names(hlo_text: str) -> dict[str, str]:
    return {name: op for name, op in _INSTRUCTION.findall(hlo_text)}


def _part(op_name: str, parts=JAX_PARTS) -> str:
    for part, pattern in parts:
        if re.search(pattern, op_name):
            return part
    return "other"


def jax_breakdown(compiled, run: Callable[[], None], steps: int = 2) -> dict[str, float]:
    """Seconds per step of each part of `compiled` (whose call is `run`), from a trace."""
    import jax

    ops = _op_names(compiled.as_text())
    totals: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"),
                         recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    for event in events:
        name = event.get("name", "")
        # Control-flow thunks (while/call) enclose their bodies' thunks: count the leaves only.
        if event.get("ph") != "X" or name not in ops or name.startswith(("while", "call",
                                                                          "conditional")):
            continue
        totals[_part(ops[name])] += event.get("dur", 0) / 1e6 / steps
    return dict(totals.most_common())


def torch_breakdown(run: Callable[[], None], vocab: int, steps: int = 2) -> dict[str, float]:
    """Seconds per step of the PyTorch step's main aten ops (self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            run()
    totals: collections.Counter = collections.Counter()
    for item in prof.key_averages(group_by_input_shape=True):
        name = item.key
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
            shapes = str(item.input_shapes)
            name = "matmul (lm head)" if str(vocab) in shapes else "matmul (layers)"
        elif "scaled_dot_product" in name:
            name = "attention (sdpa fwd+bwd)"
        elif "softmax" in name or "nll_loss" in name:
            name = "loss (log_softmax, nll)"
        elif name.startswith("Optimizer") or name in ("aten::lerp_", "aten::addcdiv_",
                                                        "aten::addcmul_", "aten::sqrt",
                                                        "aten::_foreach_add_"):
            name = "optimizer"
        totals[name] += item.self_cpu_time_total / 1e6 / steps
    top = dict(collections.Counter(totals).most_common(10))
    top["other aten"] = sum(totals.values()) - sum(top.values())
    return top


def rounded(parts: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in parts.items()}
