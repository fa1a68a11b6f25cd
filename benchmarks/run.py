"""All CPU benchmarks against the PyTorch stack in one run: one JSON object a line (each with
`name` and its ratio fields), then a summary table.

    python -m benchmarks.run            # the default dims (13.8 minutes on 2 busy cores, 2026-12-04)
    python -m benchmarks.run --quick    # fewer runs and smaller dims (~3 minutes)
    python -m benchmarks.run --only sft_train_step,generation --profile

Each benchmark runs in its own process (its own XLA and torch thread pools and memory), one
after the other; a failed one is reported as a line with "error" and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import cpu_model

# Every benchmark runs on jax's default XLA:CPU flags, what the library and the main job get
# out of the box; an XLA_FLAGS of your own is passed through, and every line records the flags
# it ran with. (The train steps used oneDNN dots until the projections became one
# [rows, in] x [in, out] product; since then the defaults are as fast or faster on the Xeon:
# docs/benchmarks.md.)

# name -> (module, full args, quick args, the ratio fields its lines carry: (field, lower is
# better))
BENCHMARKS = {
    "sft_train_step": ("benchmarks.train_step", [], ["--runs", "3", "--layers", "4"],
                       (("ratio_ours_over_theirs", True),)),
    "video_llm_train_step": ("benchmarks.video_step", [],
                             ["--runs", "3", "--layers", "4", "--vision_layers", "2"],
                             (("ratio_ours_over_theirs", True),)),
    "generation": ("benchmarks.generation", [],
                   ["--runs", "2", "--layers", "4", "--new", "32", "--cache_variants", ""],
                   (("tokens_per_s_ratio_ours_over_theirs", False),)),
    "data_pipeline": ("benchmarks.data_pipeline", [],
                      ["--num_train", "64", "--steps", "16", "--long_source_frames", "0",
                       "--runs", "2"],
                      (("ratio_vs_loop_per_item", False), ("ratio_vs_loop_per_video", False),
                       ("wait_fraction", True))),
}


def run_one(name: str, quick: bool, profile: bool, timeout: float) -> list[dict]:
    module, full, short, _ = BENCHMARKS[name]
    args = list(short if quick else full)
    if profile and name in ("sft_train_step", "video_llm_train_step", "generation"):
        args.append("--profile")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"name": name, "error": f"timed out after {timeout:.0f} s"}]
    records = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "name" not in record:  # data_pipeline names its lines 'benchmark'
                record["name"] = f"{name}/{record.get('benchmark', '')}".rstrip("/")
            records.append(record)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        records.append({"name": name, "error": f"exit {proc.returncode}: {' | '.join(tail)}"})
    for record in records:
        record.setdefault("benchmark_seconds", round(time.perf_counter() - started, 1))
        record.setdefault("cpu_model", cpu_model())
    return records


def summary(records: list[dict]) -> str:
    """A plain-text table: benchmark line, ratio field, value, which direction is better."""
    fields = {field: lower for *_, ratios in BENCHMARKS.values() for field, lower in ratios}
    rows = [("benchmark", "ratio", "value", "better")]
    for record in records:
        label = record["name"] + "".join(f" [{record[key]}]" for key in ("mode", "variant")
                                         if key in record)
        if record["name"] == "generation" and "dims" in record:
            label += f" [batch {record['dims']['batch']}]"
        if "source_frames" in record:
            label += f" [{record['source_frames']}-frame sources]"
        if "error" in record:
            rows.append((label, "error", record["error"][:60], ""))
        for field, lower in fields.items():
            if field in record:
                rows.append((label, field, f"{record[field]:.3f}",
                             "lower" if lower else "higher"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller dims")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--profile", action="store_true", help="also where train-step time goes")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per benchmark")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    records = []
    for name in names:
        for record in run_one(name, args.quick, args.profile, args.timeout):
            print(json.dumps(record), flush=True)
            records.append(record)
    print(summary(records), flush=True)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
