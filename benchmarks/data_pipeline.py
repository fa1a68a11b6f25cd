"""Input pipeline benchmark: decode throughput (build + read) and input wait of a train step.

    python -m benchmarks.data_pipeline [--num_train 160 --batch_size 16 --max_length 128]

Prints one JSON object a line:
- `decode`: videos a second for the same items of the synthetic world's SFT splits, three ways:
  a plain single-threaded decord loop decoding and preprocessing each item's video as it is read
  (`loop_per_item`), the same loop decoding each distinct video once (`loop_per_video`), and the
  pipeline: build (each distinct video decoded once, in threads) plus one read of every item
  (`pipeline`). Ratios are pipeline / loop. Each is run once untimed, then `--runs` times in
  turn (load that comes and goes hits all alike); times are medians, `*_all_s` every run.
- `input_wait`: a jitted stand-in for the tiny model's train step fed by `Pipeline.iterate`
  (prefetching in threads): time blocked waiting for a batch vs time computing.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _items(world: str) -> list[dict]:
    items = []
    for name in ("sft_short.json", "sft_long.json"):
        with open(os.path.join(world, name)) as f:
            items.extend(json.load(f))
    return items


def bench_decode(world: str, work: str, frames: int, size: int, batch_size: int,
                 max_length: int, workers: int, runs: int) -> dict:
    import decord

    from benchmarks.common import alternate, cpu_model
    from rlaif_jax.data import video
    from rlaif_jax.data.build import build
    from rlaif_jax.data.pipeline import Pipeline
    from transformers import AutoTokenizer

    items = _items(world)
    paths = [os.path.join(world, item["images"]) for item in items]
    distinct = list(dict.fromkeys(paths))

    def decode(path):
        reader = decord.VideoReader(path, num_threads=1)
        raw = reader.get_batch(list(video.sample_indices(len(reader), frames))).asnumpy()
        return video.preprocess_frames(raw, size)

    splits = {"short": os.path.join(world, "sft_short.json"),
              "long": os.path.join(world, "sft_long.json")}
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(world, "tokenizer"))
    parts = {"build": [], "read": []}

    def pipeline():
        # A DATA_DIR is built once: each run writes its own (the warm-up's is the one
        # bench_input_wait reads).
        run = len(parts["build"])
        out = os.path.join(work, f"data_{run}" if run else "data")
        started = time.perf_counter()
        build("instruction", splits, world, out, frames, size, workers=workers, verbose=False)
        built = time.perf_counter()
        read_items = 0
        for split in splits:
            pipe = Pipeline(out, split, tokenizer, batch_size, max_length, shuffle=False,
                            workers=workers)
            for _, batch in pipe.iterate(0, pipe.steps_per_epoch):
                read_items += int(batch["valid"].sum())
        assert read_items == len(items)
        parts["build"].append(built - started)
        parts["read"].append(time.perf_counter() - built)

    times = alternate({"loop_per_item": lambda: [decode(p) for p in paths],
                       "loop_per_video": lambda: [decode(p) for p in distinct],
                       "pipeline": pipeline}, runs)
    loop, per_video, ours = (times[k] for k in ("loop_per_item", "loop_per_video", "pipeline"))
    build_s, read_s = (float(np.median(parts[k][1:])) for k in ("build", "read"))  # [0]: warm-up
    return {
        "benchmark": "decode", "items": len(items), "distinct_videos": len(distinct),
        "frames": frames, "size": size, "workers": workers, "cpus": os.cpu_count(),
        "cpu_model": cpu_model(), "load_avg_1m": round(os.getloadavg()[0], 2), "runs": runs,
        "loop_per_item_s": round(loop["wall_s"], 3),
        "loop_per_video_s": round(per_video["wall_s"], 3),
        "pipeline_s": round(ours["wall_s"], 3),
        "pipeline_build_s": round(build_s, 3), "pipeline_read_s": round(read_s, 3),
        "loop_per_item_videos_per_s": round(len(items) / loop["wall_s"], 1),
        "pipeline_videos_per_s": round(len(items) / ours["wall_s"], 1),
        "ratio_vs_loop_per_item": round(loop["wall_s"] / ours["wall_s"], 2),
        "ratio_vs_loop_per_video": round(per_video["wall_s"] / ours["wall_s"], 2),
        # Process CPU time (all threads): less sensitive to other processes, blind to threads.
        "cpu_ratio_vs_loop_per_item": round(loop["cpu_s"] / ours["cpu_s"], 2),
        "loop_per_item_all_s": loop["wall_all_s"], "pipeline_all_s": ours["wall_all_s"],
    }


def bench_input_wait(world: str, work: str, batch_size: int, max_length: int, steps: int,
                     workers: int) -> dict:
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from rlaif_jax.data.pipeline import Pipeline

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(world, "tokenizer"))
    pipe = Pipeline(os.path.join(work, "data"), "short", tokenizer, batch_size, max_length,
                    seed=0, workers=workers)
    width = 256
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"embed": jax.random.normal(keys[0], (len(tokenizer) + 1, width)) * 0.02,
              "patch": jax.random.normal(keys[1], (8 * 8 * 3, width)) * 0.02,
              "w1": jax.random.normal(keys[2], (width, 4 * width)) * 0.02,
              "w2": jax.random.normal(keys[3], (4 * width, width)) * 0.02}

    def loss_fn(p, batch):
        # A tiny model's shape of work: patches of the frames, token embeddings, one MLP block.
        frames = batch["frames"].astype(jnp.float32) / 255.0
        b, t, h, w, c = frames.shape
        patches = frames.reshape(b, t, h // 8, 8, w // 8, 8, c).transpose(0, 1, 2, 4, 3, 5, 6)
        video = (patches.reshape(b, -1, 8 * 8 * c) @ p["patch"]).mean(axis=1, keepdims=True)
        x = p["embed"][batch["input_ids"]] + video
        x = x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]
        logits = x @ p["embed"].T
        mask = batch["labels"] >= 0
        log_probs = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(log_probs, jnp.maximum(batch["labels"], 0)[..., None], -1)
        return -(picked[..., 0] * mask).sum() / jnp.maximum(mask.sum(), 1)

    @jax.jit
    def train_step(p, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        return jax.tree.map(lambda w, g: w - 1e-3 * g, p, grads), loss

    keys_used = ("frames", "input_ids", "labels")
    first = {k: v for k, v in pipe.batch(0).items() if k in keys_used}
    params, loss = train_step(params, first)  # compile outside the timing
    loss.block_until_ready()
    waits, computes = [], []
    iterator = pipe.iterate(1, steps)
    while True:
        started = time.perf_counter()
        item = next(iterator, None)
        if item is None:
            break
        ready = time.perf_counter()
        params, loss = train_step(params, {k: v for k, v in item[1].items() if k in keys_used})
        loss.block_until_ready()
        waits.append(ready - started)
        computes.append(time.perf_counter() - ready)
    # Producing a batch alone, without a step running beside it.
    started = time.perf_counter()
    for step in range(steps):
        pipe.batch(step)
    produce = (time.perf_counter() - started) / steps
    return {
        "benchmark": "input_wait", "batch_size": batch_size, "max_length": max_length,
        "steps": len(waits), "step_compute_ms": round(1000 * float(np.mean(computes)), 2),
        "input_wait_ms": round(1000 * float(np.mean(waits)), 2),
        "input_wait_p90_ms": round(1000 * float(np.percentile(waits, 90)), 2),
        "wait_fraction": round(float(np.sum(waits) / (np.sum(waits) + np.sum(computes))), 4),
        "batch_production_ms": round(1000 * produce, 2),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_train", type=int, default=160)
    parser.add_argument("--frames", type=int, default=8, help="frames sampled a video")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--long_source_frames", type=int, default=64,
                        help="also measure decoding on videos this long at --long_size px "
                             "(0 to skip): decoding, not overheads, then dominates")
    parser.add_argument("--long_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each side, in turn")
    args = parser.parse_args(argv)

    from rlaif_jax.data.synthetic import generate_world

    with tempfile.TemporaryDirectory() as work:
        world = os.path.join(work, "world")
        generate_world(world, num_train=args.num_train, num_eval=4, frames=args.frames,
                       size=args.size, seed=0, progress=False)
        result = bench_decode(world, work, args.frames, args.size, args.batch_size,
                              args.max_length, args.workers, args.runs)
        print(json.dumps({"source_frames": args.frames, **result}), flush=True)
        print(json.dumps(bench_input_wait(world, work, args.batch_size, args.max_length,
                                          args.steps, args.workers)), flush=True)
    if args.long_source_frames:
        with tempfile.TemporaryDirectory() as work:
            world = os.path.join(work, "world")
            generate_world(world, num_train=args.num_train // 2, num_eval=4,
                           frames=args.long_source_frames, size=args.long_size, seed=0,
                           progress=False)
            result = bench_decode(world, work, args.frames, args.long_size, args.batch_size,
                                  args.max_length, args.workers, args.runs)
            print(json.dumps({"source_frames": args.long_source_frames, **result}), flush=True)


if __name__ == "__main__":
    main()
