"""Train step and generation of the 7B-shaped LLaMA in bfloat16 on one accelerator: tokens per
second and MFU. Run by `benchmarks/gpu.sh` on a GPU machine; runs anywhere at small dims:

    python -m benchmarks.gpu_step --layers 2 --hidden 256      # a CPU smoke check
    python -m benchmarks.gpu_step                               # Vicuna-7B's shape, all layers

The train step is docs/method.md's recipe: a frozen bf16 base with LoRA r 64 on all seven projections,
AdamW on the adapter, the preset's remat policy (`--mode full` trains every weight instead; that
needs ~16 bytes a parameter, so use fewer layers). Weights are random (speed does not depend on
them). Prints one JSON object a line: seconds a step, tokens/s, model FLOP/s and MFU against the
device's bf16 peak (benchmarks only know the peaks in rlaif_jax/models/flops.py).

`--torch` also times the same train step and generation in PyTorch on the same device
(`benchmarks/torch_llama_step.py`: transformers' LlamaForCausalLM in bf16, peft LoRA, sdpa), in
a child process that runs and exits before our side takes the device's memory, and prints
`gpu_vs_torch` lines with the ratios (time ours / theirs; tokens/s ours / theirs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.train_step import next_token_loss
from configs import models as model_presets
from rlaif_jax.models import flops as flops_lib
from rlaif_jax.models.fused_attention import resolve
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.sampling.generate import SamplingConfig, generate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=0, help="0: all 32")
    p.add_argument("--hidden", type=int, default=0, help="0: 4096 (heads and FFN scale with it)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--remat", default="", help="'' : the preset's (dots_no_batch)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gen_batch", type=int, default=32)
    p.add_argument("--gen_prompt", type=int, default=128)
    p.add_argument("--gen_new", type=int, default=256)
    p.add_argument("--skip_generation", action="store_true")
    p.add_argument("--attention_block", type=int, default=-1,
                   help="causal query blocks (LlamaConfig.attention_block); -1: the preset's")
    p.add_argument("--attention_impl", default="auto",
                   help="LlamaConfig.attention_impl: auto (cuDNN on a GPU in bf16), xla, blocked, "
                        "cudnn, pallas_gpu")
    p.add_argument("--torch", action="store_true",
                   help="also time PyTorch (transformers + peft) at the same dims; print ratios")
    p.add_argument("--torch_checkpointing", default="off,on",
                   help="PyTorch gradient checkpointing settings to time (off, on)")
    p.add_argument("--torch_timeout", type=float, default=600)
    p.add_argument("--profile", action="store_true",
                   help="also where the train step's time goes (ours: jax.profiler trace of 2 "
                        "steps; with --torch, theirs: torch.profiler's device time)")
    p.add_argument("--trace_dir", default="",
                   help="with --profile: keep the raw trace and the step's HLO text here")
    return p


def model_config(args) -> LlamaConfig:
    values = model_presets.vicuna7b().to_dict()
    values.update(dtype="bfloat16", param_dtype="bfloat16")
    if args.layers:
        values["num_layers"] = args.layers
    if args.hidden:
        scale = args.hidden / values["hidden_size"]
        values.update(hidden_size=args.hidden, num_heads=max(1, args.hidden // 128),
                      intermediate_size=int(values["intermediate_size"] * scale) // 8 * 8)
    if args.remat:
        values["remat_policy"] = args.remat
    if args.attention_block >= 0:
        values["attention_block"] = args.attention_block
    values["attention_impl"] = args.attention_impl
    values["lora"] = dict(values["lora"], rank=args.lora_rank if args.mode == "lora" else 0)
    return LlamaConfig.from_dict(values)


def timed(fn, steps: int) -> list[float]:
    fn()  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def peak_memory_gib(device):
    """The device allocator's peak so far (GPU/TPU), None where the backend keeps no stats."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**30, 2)


def train_record(config: LlamaConfig, args, device) -> tuple[dict, dict]:
    import flax.linen as nn

    model = Llama(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(
        3, config.vocab_size, (args.batch, args.length), dtype=np.int32))
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids[:1, :8]))
    if args.mode == "lora":
        frozen, trainable = variables["params"], variables["lora"]
        # The adapter trains in float32 (bf16 AdamW updates of 1e-4 round away).
        trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)

        def loss_fn(train, frozen, batch):
            return next_token_loss(model, {"params": frozen, "lora": train}, batch)
    else:
        frozen, trainable = {}, variables["params"]

        def loss_fn(train, frozen, batch):
            return next_token_loss(model, {"params": train}, batch)

    optimizer = optax.adamw(1e-4)

    def step(state, frozen, batch):
        train, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(train, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, train)
        return (optax.apply_updates(train, updates), opt_state), loss

    step = jax.jit(step, donate_argnums=0)
    holder = {"state": (trainable, optimizer.init(trainable))}

    def run():
        holder["state"], loss = step(holder["state"], frozen, ids)
        loss.block_until_ready()

    times = timed(run, args.steps)
    seconds = statistics.median(times)
    breakdown = None
    if args.profile:
        try:
            breakdown = profile_train_step(step, holder, frozen, ids, run, args.trace_dir)
        except Exception as error:  # a profile that fails must not lose the timing
            breakdown = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    flops = flops_lib.llama_train_step_flops(config, args.batch, args.length,
                                             training="lora" if args.mode == "lora" else "full")
    peak = flops_lib.peak_flops(device)
    tokens = args.batch * args.length
    return {
        "name": "gpu_train_step", "mode": args.mode, "layers": config.num_layers,
        "hidden": config.hidden_size, "batch": args.batch, "length": args.length,
        "remat": config.remat_policy, "attention_block": config.attention_block,
        "attention_impl": resolve(config.attention_impl, config.compute_dtype,
                                  config.dim_per_head, config.attention_block),
        "step_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1), "model_tflops": round(flops / seconds / 1e12, 2),
        "mfu": None if peak is None else round(flops / seconds / peak, 4),
        "all_s": [round(t, 4) for t in times], "peak_gib": peak_memory_gib(device),
        **({} if breakdown is None else {"ours_s_by_part": breakdown}),
    }, {"model": model, "params": variables["params"]}


def profile_train_step(step, holder, frozen, ids, run, trace_dir: str = "") -> dict:
    """Seconds a step by model part from a jax.profiler trace of two steps
    (benchmarks/profile.py); the raw trace and HLO text are kept in `trace_dir` if given."""
    from benchmarks.profile import jax_breakdown, rounded

    compiled = step.lower(holder["state"], frozen, ids).compile()
    return rounded(jax_breakdown(compiled, run, keep_dir=trace_dir or None))


def generation_record(config: LlamaConfig, built: dict, args, device) -> dict:
    model, params = built["model"], built["params"]
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.vocab_size, (args.gen_batch, args.gen_prompt), dtype=np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    sampling = SamplingConfig(max_new_tokens=args.gen_new, temperature=1.0, eos_token_id=None,
                              prompt_bucket=args.gen_prompt)

    def run():
        generate(model, {"params": params}, batch, jax.random.PRNGKey(0),
                 sampling).tokens.block_until_ready()

    times = timed(run, max(2, args.steps // 2))
    seconds = statistics.median(times)
    new_tokens = args.gen_batch * args.gen_new
    # Prefill + one forward a new token (matmul FLOPs; decode is bound by memory, not FLOPs).
    flops = (flops_lib.llama_forward_flops(config, args.gen_batch, args.gen_prompt)
             + flops_lib.llama_forward_flops(config, new_tokens, 1))
    peak = flops_lib.peak_flops(device)
    return {
        "name": "gpu_generation", "layers": config.num_layers, "hidden": config.hidden_size,
        "batch": args.gen_batch, "prompt": args.gen_prompt, "new_tokens": args.gen_new,
        "generate_s": round(seconds, 4), "tokens_per_s": round(new_tokens / seconds, 1),
        "mfu": None if peak is None else round(flops / seconds / peak, 5),
        "all_s": [round(t, 4) for t in times],
    }


def torch_side(args) -> list[dict]:
    """Runs benchmarks/torch_llama_step.py at the same dims in a child process (before jax takes
    the device); its JSON lines, or one line with the error."""
    command = [sys.executable, "-m", "benchmarks.torch_llama_step", "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--batch", str(args.batch),
               "--length", str(args.length), "--mode", args.mode,
               "--lora_rank", str(args.lora_rank), "--steps", str(args.steps),
               "--checkpointing", args.torch_checkpointing, "--gen_batch", str(args.gen_batch),
               "--gen_prompt", str(args.gen_prompt), "--gen_new", str(args.gen_new)]
    if args.skip_generation:
        command.append("--skip_generation")
    if args.profile:
        command.append("--profile")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.torch_timeout)
    except subprocess.TimeoutExpired:
        return [{"side": "torch", "error": f"timed out after {args.torch_timeout:.0f} s"}]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        records.append({"side": "torch", "error": f"exit {proc.returncode}: {tail}"[:600]})
    return records


def comparisons(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """`gpu_vs_torch` lines: our train step against each PyTorch checkpointing setting (time,
    lower is better) and generation tokens/s (higher is better)."""
    out = []
    train = next((r for r in ours if r["name"] == "gpu_train_step"), None)
    for record in theirs:
        if record.get("name") == "torch_train_step" and train and "step_s" in record:
            out.append({"name": "gpu_vs_torch", "what": "train_step", "mode": train["mode"],
                        "ours_remat": train["remat"],
                        "torch_checkpointing": record["checkpointing"],
                        "ours_s": train["step_s"], "theirs_s": record["step_s"],
                        "ratio_ours_over_theirs": round(train["step_s"] / record["step_s"], 3)})
    generation = next((r for r in ours if r["name"] == "gpu_generation"), None)
    for record in theirs:
        if record.get("name") == "torch_generation" and generation and "generate_s" in record:
            out.append({"name": "gpu_vs_torch", "what": "generation",
                        "ours_tokens_per_s": generation["tokens_per_s"],
                        "theirs_tokens_per_s": record["tokens_per_s"],
                        "tokens_per_s_ratio_ours_over_theirs": round(
                            generation["tokens_per_s"] / record["tokens_per_s"], 3)})
    return out


def main(argv=None):
    args = parser().parse_args(argv)
    theirs = []
    if args.torch:  # first: the child exits and frees the device before jax preallocates it
        theirs = torch_side(args)
        for record in theirs:
            print(json.dumps(record), flush=True)
    device = jax.devices()[0]
    config = model_config(args)
    head = {"platform": device.platform, "device_kind": getattr(device, "device_kind", ""),
            "jax": jax.__version__, "peak_bf16_flops": flops_lib.peak_flops(device)}
    ours = []
    record, built = train_record(config, args, device)
    ours.append(record)
    print(json.dumps({**head, **record}), flush=True)
    if not args.skip_generation:
        record = generation_record(config, built, args, device)
        ours.append(record)
        print(json.dumps({**head, **record}), flush=True)
    for record in comparisons(ours, theirs):
        print(json.dumps({**head, **record}), flush=True)


if __name__ == "__main__":
    main()
