"""Train step and generation of the 7B-shaped LLaMA in bfloat16 on one accelerator: tokens per
second and MFU. Run by `benchmarks/gpu.sh` on a GPU machine; runs anywhere at small dims:

    python -m benchmarks.gpu_step --layers 2 --hidden 256      # a CPU smoke check
    python -m benchmarks.gpu_step                               # Vicuna-7B's shape, all layers

The train step is SPEC.md's recipe: a frozen bf16 base with LoRA r 64 on all seven projections,
AdamW on the adapter, the preset's remat policy (`--mode full` trains every weight instead; that
needs ~16 bytes a parameter, so use fewer layers). Weights are random (speed does not depend on
them). Prints one JSON object a line: seconds a step, tokens/s, model FLOP/s and MFU against the
device's bf16 peak (benchmarks only know the peaks in rlaif_jax/models/flops.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.train_step import next_token_loss
from configs import models as model_presets
from rlaif_jax.models import flops as flops_lib
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.rollout.generate import SamplingConfig, generate


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
            logits = model.apply({"params": frozen, "lora": train}, batch).logits
            return next_token_loss(logits, batch)
    else:
        frozen, trainable = {}, variables["params"]

        def loss_fn(train, frozen, batch):
            return next_token_loss(model.apply({"params": train}, batch).logits, batch)

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

    seconds = statistics.median(timed(run, args.steps))
    flops = flops_lib.llama_train_step_flops(config, args.batch, args.length,
                                             training="lora" if args.mode == "lora" else "full")
    peak = flops_lib.peak_flops(device)
    tokens = args.batch * args.length
    return {
        "name": "gpu_train_step", "mode": args.mode, "layers": config.num_layers,
        "hidden": config.hidden_size, "batch": args.batch, "length": args.length,
        "remat": config.remat_policy, "step_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1), "model_tflops": round(flops / seconds / 1e12, 2),
        "mfu": None if peak is None else round(flops / seconds / peak, 4),
    }, {"model": model, "params": variables["params"]}


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

    seconds = statistics.median(timed(run, max(2, args.steps // 2)))
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
    }


def main(argv=None):
    args = parser().parse_args(argv)
    device = jax.devices()[0]
    config = model_config(args)
    head = {"platform": device.platform, "device_kind": getattr(device, "device_kind", ""),
            "peak_bf16_flops": flops_lib.peak_flops(device)}
    record, built = train_record(config, args, device)
    print(json.dumps({**head, **record}), flush=True)
    if not args.skip_generation:
        print(json.dumps({**head, **generation_record(config, built, args, device)}), flush=True)


if __name__ == "__main__":
    main()
