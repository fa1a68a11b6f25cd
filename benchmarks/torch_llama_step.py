"""The PyTorch side of `benchmarks/gpu_step.py`: transformers' LlamaForCausalLM at the same dims,
its LoRA train step (peft) and `generate`, timed on the same device.

    python -m benchmarks.torch_llama_step --layers 8                 # on a GPU: the 7B width
    python -m benchmarks.torch_llama_step --layers 2 --hidden 256    # a CPU smoke check

`gpu_step.py --torch` runs this in a child process before its own side (so the two never hold
the device's memory at once) and prints the ratios. The setup is the one a PyTorch user of
LLaVA-style LoRA training runs: a bfloat16 base, peft LoRA on all seven projections (adapters
kept in float32, peft's default), the forward under `torch.autocast(bfloat16)`, sdpa attention
(flash on a GPU), fused AdamW on the adapter, the loss on float32 logits; once without and once
with gradient checkpointing (`use_reentrant=False`). Generation uses the base model without the
adapter (as ours does), sampling at temperature 1 with no top-k / top-p and no early stop.
Prints one JSON object a line, `"side": "torch"`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dims(args) -> dict:
    """The LLaMA dims `gpu_step.model_config` uses: Vicuna-7B's, with `--hidden` scaling heads
    (head dim 128) and the FFN as there."""
    hidden, heads, inter = 4096, 32, 11008
    if args.hidden:
        inter = int(inter * args.hidden / hidden) // 8 * 8
        hidden, heads = args.hidden, max(1, args.hidden // 128)
    return dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
                num_hidden_layers=args.layers or 32)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=0, help="0: all 32")
    p.add_argument("--hidden", type=int, default=0, help="0: 4096")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--mode", choices=("lora", "full"), default="lora")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--lora_alpha", type=float, default=16.0, help="the presets' alpha")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", default="off,on",
                   help="gradient checkpointing settings to time, comma-separated of off, on")
    p.add_argument("--gen_batch", type=int, default=32)
    p.add_argument("--gen_prompt", type=int, default=128)
    p.add_argument("--gen_new", type=int, default=256)
    p.add_argument("--skip_generation", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also the train step's device time by kernel kind (torch.profiler)")
    return p


def synchronize(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, steps: int, sync) -> tuple[float, list[float]]:
    fn()  # warm-up: allocator, kernels picked, cuBLAS handles
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), [round(t, 4) for t in times]


def build_model(args, torch, device):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **dims(args))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no float32 copy
    try:
        with device:
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def generation_record(model, args, torch, device, sync) -> dict:
    rng = np.random.default_rng(1)
    ids = torch.as_tensor(rng.integers(3, 32000, (args.gen_batch, args.gen_prompt)),
                          dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    model.eval()

    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=args.gen_new,
                           min_new_tokens=args.gen_new, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, pad_token_id=0)

    seconds, all_s = median_seconds(run, max(2, args.steps // 2), sync)
    new_tokens = args.gen_batch * args.gen_new
    return {"name": "torch_generation", "generate_s": round(seconds, 4),
            "tokens_per_s": round(new_tokens / seconds, 1), "all_s": all_s}


# First match wins: (kind, regex over a CUDA kernel's name).
KERNEL_KINDS = (
    ("attention (flash/sdpa)", r"flash|fmha|attention"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|matmul|splitK"),
    ("loss (softmax, nll)", r"softmax|nll|cross_entropy"),
    ("optimizer", r"adam|multi_tensor"),
    ("reductions", r"reduce|norm"),
    ("elementwise, copies", r"."),
)


def kernel_kind(name: str) -> str:
    import re

    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, re.I):
            return kind
    return "other"


def device_breakdown(step, torch, device, sync, steps: int = 2) -> dict:
    """Seconds a step of device time by kernel kind, and the top kernels (CUDA only)."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    kinds: collections.Counter = collections.Counter()
    kernels: collections.Counter = collections.Counter()
    for item in prof.key_averages():
        # Kernels only: an aten op's device time is its kernels' again.
        if "CUDA" not in str(getattr(item, "device_type", "")):
            continue
        seconds = (getattr(item, "self_device_time_total", 0) or 0) / 1e6 / steps
        kinds[kernel_kind(item.key)] += seconds
        kernels[item.key[:90]] += seconds
    return {"theirs_s_by_kind": {k: round(v, 4) for k, v in kinds.most_common()},
            "theirs_top_kernels": {k: round(v, 4) for k, v in kernels.most_common(12)}}


def train_records(model, args, torch, device, sync) -> list[dict]:
    info = {}
    if args.mode == "lora":
        import peft

        lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                               target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)  # adapters in float32 (autocast_adapter_dtype)
        info["peft"] = peft.__version__
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(3, 32000, (args.batch, args.length)), dtype=torch.long,
                          device=device)
    # transformers' shift without copying the logits: the last position has no target.
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)
        loss.backward()
        optimizer.step()

    records = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for setting in [s for s in args.checkpointing.split(",") if s]:
        # transformers >= 5.2x renames gradient_* to activation_checkpointing_*.
        prefix = ("activation_checkpointing" if hasattr(base, "activation_checkpointing_enable")
                  else "gradient_checkpointing")
        if setting == "on":
            getattr(base, f"{prefix}_enable")(**{f"{prefix}_kwargs": {"use_reentrant": False}})
        else:
            getattr(base, f"{prefix}_disable")()
        record = {"name": "torch_train_step", "mode": args.mode, "checkpointing": setting, **info}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, all_s = median_seconds(step, args.steps, sync)
            record.update(step_s=round(seconds, 4), all_s=all_s,
                          tokens_per_s=round(args.batch * args.length / seconds, 1))
            if device.type == "cuda":
                record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if args.profile:
                    record.update(device_breakdown(step, torch, device, sync))
        except Exception as error:  # e.g. out of memory without checkpointing: keep the others
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(record)
    return records


def main(argv=None):
    args = parser().parse_args(argv)
    import torch
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = lambda: synchronize(torch, device)  # noqa: E731
    head = {"side": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "layers": args.layers or 32, "hidden": dims(args)["hidden_size"],
            "batch": args.batch, "length": args.length}
    model = build_model(args, torch, device)
    if not args.skip_generation:
        try:
            record = generation_record(model, args, torch, device, sync)
        except Exception as error:
            record = {"name": "torch_generation",
                      "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(json.dumps({**head, **record, "gen_batch": args.gen_batch,
                          "gen_prompt": args.gen_prompt, "gen_new": args.gen_new}), flush=True)
    try:
        records = train_records(model, args, torch, device, sync)
    except Exception as error:  # peft missing, say: the generation line still stands
        records = [{"name": "torch_train_step",
                    "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}]
    for record in records:
        print(json.dumps({**head, **record}), flush=True)


if __name__ == "__main__":
    main()
