"""Generation throughput: our jitted KV-cache sampler vs transformers' `generate` (with its cache).

One random LLaMA (built in transformers, saved, loaded by us: the same weights), the same
left-padded prompts, the same number of new tokens, no early stop; runs alternated, medians.
Prints one JSON object a line: generated tokens/s of each side and the ratio, and for greedy the
share of rows whose tokens agree exactly with transformers'.

- The main lines, with the model's own float32 KV cache: `mode` greedy at every `--batch`
  (default 8 and 64), and sample_t1 (temperature 1, no top-k / top-p) at the first.
- torch's thread count is the faster of its default and 1, probed on a few tokens
  (benchmarks/common.py: fastest_torch_threads); each line records both times.
- Variants, at the first batch, greedy: a bfloat16 and an int8 cache (`variant` cache_bfloat16 /
  cache_int8); their ratio is against transformers' float32 `generate`, and `rows_identical`
  says how often the smaller cache still picks transformers' tokens.
- `--profile`: where transformers' decode step goes (torch.profiler: matmuls, attention, cache
  concatenation, the rest) and what the same matmuls cost alone, in torch and in XLA: whether a
  ratio goal is reachable when both sides pay for the same matmuls (the 32000-wide head).

    python -m benchmarks.generation [--layers 8 --hidden 512 --heads 8 --batch 8,64 --prompt 128 --new 128]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import rlaif_jax
from benchmarks.common import add_llama_dims, fastest_torch_threads, machine
from rlaif_jax.sampling.generate import SamplingConfig, generate


def left_padded_prompts(batch: int, length: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row, n in enumerate(rng.integers(length // 2, length + 1, batch)):
        ids[row, length - n:] = rng.integers(3, vocab, n)
        mask[row, length - n:] = 1
    return ids, mask


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_llama_dims(p, runs=3)
    p.add_argument("--batch", default="8,64", help="comma-separated batch sizes (rows)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--modes", default="greedy,sample_t1", help="of greedy, sample_t1")
    p.add_argument("--cache_variants", default="bfloat16,int8",
                   help="cache dtypes of the greedy variant lines at the first batch ('' none)")
    p.add_argument("--profile", action="store_true",
                   help="also the matmul share of transformers' decode step")
    return p


class Sides:
    """Both models on the same weights; `ours(batch, sampling)` / `theirs(batch, temperature)`
    return [B, new] tokens."""

    def __init__(self, args):
        torch.manual_seed(0)
        hf_config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
            intermediate_size=int(args.hidden * 8 / 3) // 8 * 8, num_attention_heads=args.heads,
            max_position_embeddings=args.prompt + args.new, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
        hf_config._attn_implementation = "sdpa"
        self.theirs_model = transformers.LlamaForCausalLM(hf_config).eval()
        with tempfile.TemporaryDirectory() as directory:
            self.theirs_model.save_pretrained(directory)
            self.model, params = rlaif_jax.from_pretrained(directory)
        self.variables = {"params": params}
        self.args = args

    def ours(self, batch, sampling):
        key = jax.random.PRNGKey(0)
        return np.asarray(generate(self.model, self.variables, batch, key, sampling).tokens)

    def theirs(self, batch, temperature, new=None):
        new = new or self.args.new
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
        with torch.no_grad():
            # No top-k / top-p when sampling (transformers' default top_k is 50).
            sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            out = self.theirs_model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                **(sample if temperature > 0 else dict(do_sample=False)))
        return out[:, ids.shape[1]:].numpy()


def timed_pair(ours, theirs, runs: int):
    """Warm-up (compile) once each, then `runs` alternated timings; medians and first outputs."""
    ours_tokens, theirs_tokens = ours(), theirs()
    times = {"ours": [], "theirs": []}
    for _ in range(runs):
        for name, run in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: [round(x, 4) for x in t] for name, t in times.items()},
            ours_tokens, theirs_tokens)


def measure(sides: Sides, args, rows: int, mode: str, cache_dtype: str = "") -> dict:
    temperature = 0.0 if mode == "greedy" else 1.0
    ids, mask = left_padded_prompts(rows, args.prompt, args.vocab)
    batch = {"input_ids": ids, "attention_mask": mask}
    sampling = SamplingConfig(max_new_tokens=args.new, temperature=temperature,
                              eos_token_id=None, prompt_bucket=args.prompt,
                              cache_dtype=cache_dtype)
    # A few tokens of theirs pick torch's thread count (benchmarks/common.py says why).
    probe = fastest_torch_threads(lambda: sides.theirs(batch, temperature, new=4))
    median, every, ours_tokens, theirs_tokens = timed_pair(
        lambda: sides.ours(batch, sampling), lambda: sides.theirs(batch, temperature), args.runs)
    generated = rows * args.new
    dims = {k: v for k, v in vars(args).items() if k not in ("batch", "profile")}
    record = {"name": "generation", "mode": mode}
    if cache_dtype:
        record["variant"] = f"cache_{cache_dtype}"
    record.update({
        "dims": {**dims, "batch": rows}, "cache_dtype": cache_dtype or "float32",
        **machine(), "jax_backend": jax.default_backend(),
        "ours_tokens_per_s": round(generated / median["ours"], 1),
        "theirs_tokens_per_s": round(generated / median["theirs"], 1),
        "tokens_per_s_ratio_ours_over_theirs": round(median["theirs"] / median["ours"], 3),
        "ours_s": round(median["ours"], 4), "theirs_s": round(median["theirs"], 4),
        "ours_all_s": every["ours"], "theirs_all_s": every["theirs"],
        "torch_thread_probe_s": probe,
    })
    if mode == "greedy":
        record["rows_identical"] = float(np.mean(np.all(ours_tokens == theirs_tokens, -1)))
    return record


# ---------------------------------------------------------------------------------------------
# --profile: how much of transformers' decode step is matmul


def _torch_op_kind(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention (sdpa)"
    if name == "aten::cat":
        return "cache concatenation"
    return "other aten"


def _decode_matmul_seconds_torch(model, rows: int, repeats: int = 20) -> float:
    """One decode step's matmuls alone in torch: every projection, the MLP and the LM head on
    [rows, hidden] inputs (what both sides must pay per generated token)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    with torch.no_grad():
        def step():
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
        step()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _decode_matmul_seconds_xla(model, rows: int, repeats: int = 20) -> float:
    """The same matmuls as one jitted XLA program (weights as arguments, as in our decode)."""
    weights = [jnp.asarray(m.weight.detach().numpy().T) for m in model.modules()
               if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[0]: jnp.ones((rows, w.shape[0]), jnp.float32) for w in weights}

    @jax.jit
    def step(weights, inputs):
        return [inputs[w.shape[0]] @ w for w in weights]

    jax.block_until_ready(step(weights, inputs))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            out = step(weights, inputs)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _best_seconds(run, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def decode_profile(sides: Sides, args, rows: int) -> dict:
    """transformers' decode step: its wall time (generate with `new` tokens minus generate with
    one, over new - 1 steps), where its op time goes, and the step's matmuls timed alone."""
    from torch.profiler import ProfilerActivity, profile

    ids, mask = left_padded_prompts(rows, args.prompt, args.vocab)
    batch = {"input_ids": ids, "attention_mask": mask}
    probe = fastest_torch_threads(lambda: sides.theirs(batch, 0.0, new=4))
    whole = _best_seconds(lambda: sides.theirs(batch, 0.0))
    prefill = _best_seconds(lambda: sides.theirs(batch, 0.0, new=1))
    step = (whole - prefill) / (args.new - 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # 16 tokens: the trace's memory
        sides.theirs(batch, 0.0, new=16)
    kinds: collections.Counter = collections.Counter()
    for item in prof.key_averages():
        kinds[_torch_op_kind(item.key)] += item.self_cpu_time_total / 1e6
    torch_mm = _decode_matmul_seconds_torch(sides.theirs_model, rows)
    xla_mm = _decode_matmul_seconds_xla(sides.theirs_model, rows)
    return {
        "name": "generation_profile", "dims": {"layers": args.layers, "hidden": args.hidden,
                                                "batch": rows, "prompt": args.prompt,
                                                "new": args.new},
        **machine(), "torch_thread_probe_s": probe,
        "theirs_generate_s": round(whole, 4), "theirs_prefill_s": round(prefill, 4),
        "theirs_decode_step_ms": round(1e3 * step, 3),
        # A generate of 16 tokens (prefill included) under torch.profiler, self time by op kind
        # (the profiler's own overhead included; the Python between ops is not).
        "theirs_profiled_s_by_kind": {k: round(v, 4) for k, v in kinds.most_common()},
        "theirs_matmul_share_of_op_time": round(kinds["matmul"] / sum(kinds.values()), 3),
        # A decode step's matmuls (projections, MLP, LM head on [rows, hidden]) timed alone.
        "decode_step_matmuls_alone_torch_ms": round(1e3 * torch_mm, 3),
        "decode_step_matmuls_alone_xla_ms": round(1e3 * xla_mm, 3),
        "theirs_step_matmul_share": round(torch_mm / step, 3),
        # If our step cost only its matmuls at XLA's speed, ours/theirs could reach this:
        "ratio_ceiling_if_only_xla_matmuls": round(step / xla_mm, 2),
    }


def main(argv=None):
    args = parser().parse_args(argv)
    batches = [int(b) for b in str(args.batch).split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    sides = Sides(args)
    for rows in batches:
        # Every mode at the first batch; greedy (the parity check) at the others, which keeps
        # `benchmarks.run` within its time on 2 cores.
        for mode in (modes if rows == batches[0] else [m for m in modes if m == "greedy"]):
            print(json.dumps(measure(sides, args, rows, mode)), flush=True)
    for cache_dtype in [c for c in args.cache_variants.split(",") if c]:
        print(json.dumps(measure(sides, args, batches[0], "greedy", cache_dtype)), flush=True)
    if args.profile:
        for rows in batches:
            print(json.dumps(decode_profile(sides, args, rows)), flush=True)


if __name__ == "__main__":
    main()
