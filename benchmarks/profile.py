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
import shutil
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

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$', re.M)
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) [(].*[{]\s*$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'(?:calls|to_apply|body)=%?([\w.\-]+)')
_OPERAND = re.compile(r'%([\w.\-]+)')
_ATTRIBUTE = re.compile(r'\b\w+=(?:\{[^}]*\}|%?[\w.\-]+)')


def _op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its JAX `op_name`. An instruction the compiler made (a fusion
    without metadata, a wrapped transpose or copy) takes the op_name of the computation it
    calls, else of the instruction that produced its first operand: it moves that op's data."""
    own, calls, operands, first_in = {}, {}, {}, {}
    computation = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        name, rest = found.groups()
        op = _OP_NAME.search(rest)
        if op:
            own[name] = op.group(1)
            if computation is not None:
                first_in.setdefault(computation, op.group(1))
        called = _CALLS.findall(rest)
        if called:
            calls[name] = called
        # Operands are the %names left once attributes (calls=%c, metadata={...}) are cut.
        operands[name] = _OPERAND.findall(_ATTRIBUTE.sub("", rest))

    def resolve(name: str, depth: int = 0):
        if name in own:
            return own[name]
        for computation in calls.get(name, ()):
            if computation in first_in:
                return first_in[computation]
        if depth < 6:
            for operand in operands.get(name, ())[:1]:
                found = resolve(operand, depth + 1)
                if found:
                    return found
        return None

    names = {}
    for name in operands:
        op = resolve(name)
        if op:
            names[name] = op
    return names


def _part(op_name: str, parts=JAX_PARTS) -> str:
    for part, pattern in parts:
        if re.search(pattern, op_name):
            return part
    return "other"


def _device_pids(events: list) -> set:
    """Trace process ids of accelerator streams ('/device:GPU:0', '/device:TPU:0', ...)."""
    return {e.get("pid") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"
            and re.search(r"/device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))}


# Kernels of a GPU trace that name no HLO instruction (library calls inside a CUDA graph).
_LIBRARY_GEMM = re.compile(r"nvjet|xmma|cutlass|cublas|gemm", re.I)


def _kernel_key(name: str) -> str:
    """XLA:GPU names a fusion's kernel after the instruction with '.' and '-' made '_'."""
    return re.sub(r"[.\-]", "_", name)


def breakdown_of_events(events: list, ops: dict[str, str], steps: int) -> dict[str, float]:
    """Seconds per step of each part from trace events. On the CPU each thunk's event carries
    its instruction's name. On a GPU/TPU only the device's events count (the host's launch
    events would count each op twice); a kernel is named after its fusion ('.' -> '_'), or
    `args.hlo_op` names the op; library GEMM kernels inside a CUDA graph name neither and are
    counted as 'matmul (library kernel, op not named)'."""
    devices = _device_pids(events)
    by_kernel = {_kernel_key(name): op for name, op in ops.items()} if devices else {}
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or (devices and event.get("pid") not in devices):
            continue
        name = str(event.get("name", ""))
        seconds = event.get("dur", 0) / 1e6 / steps
        if devices:
            op = (ops.get(name) or by_kernel.get(_kernel_key(name))
                  or ops.get(str(event.get("args", {}).get("hlo_op", ""))))
            if op is None:
                part = ("matmul (library kernel, op not named)" if _LIBRARY_GEMM.search(name)
                        else "copies" if re.search(r"memcpy|memset", name, re.I) else "other")
                totals[part] += seconds
                continue
            totals[_part(op)] += seconds
            continue
        # Control-flow thunks (while/call) enclose their bodies' thunks: count the leaves only.
        if name not in ops or name.startswith(("while", "call", "conditional")):
            continue
        totals[_part(ops[name])] += seconds
    return dict(totals.most_common())


def jax_breakdown(compiled, run: Callable[[], None], steps: int = 2,
                  keep_dir: str | None = None) -> dict[str, float]:
    """Seconds per step of each part of `compiled` (whose call is `run`), from a trace.
    `keep_dir`: also keep the trace and the HLO text there (to read them later)."""
    import jax

    hlo = compiled.as_text()
    ops = _op_names(hlo)
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"),
                         recursive=True)[0]
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
            shutil.copy(path, os.path.join(keep_dir, "train_step.perfetto_trace.json.gz"))
            with open(os.path.join(keep_dir, "train_step.hlo.txt"), "w") as f:
                f.write(hlo)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return breakdown_of_events(events, ops, steps)


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
