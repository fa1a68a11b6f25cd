"""Generation throughput: our jitted KV-cache sampler vs transformers' `generate` (with its cache).

One random LLaMA (built in transformers, saved, loaded by us: the same weights), the same
left-padded prompts, the same number of new tokens, no early stop; runs alternated, medians.
Prints one JSON object a line per decoding mode: generated tokens/s of each and the ratio, and
for greedy the share of rows whose tokens agree exactly.

    python -m benchmarks.generation [--layers 4 --hidden 256 --heads 4 --batch 8 --prompt 64 --new 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import rlaif_jax
from rlaif_jax.sampling.generate import SamplingConfig, generate


def left_padded_prompts(batch: int, length: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row, n in enumerate(rng.integers(length // 2, length + 1, batch)):
        ids[row, length - n:] = rng.integers(3, vocab, n)
        mask[row, length - n:] = 1
    return ids, mask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8, num_attention_heads=args.heads,
        max_position_embeddings=args.prompt + args.new, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    hf_config._attn_implementation = "sdpa"
    theirs_model = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        theirs_model.save_pretrained(directory)
        model, params = rlaif_jax.from_pretrained(directory)
    variables = {"params": params}
    ids, mask = left_padded_prompts(args.batch, args.prompt, args.vocab)
    batch = {"input_ids": ids, "attention_mask": mask}
    torch_ids = torch.as_tensor(ids, dtype=torch.long)
    torch_mask = torch.as_tensor(mask, dtype=torch.long)

    for mode, temperature in (("greedy", 0.0), ("sample_t1", 1.0)):
        sampling = SamplingConfig(max_new_tokens=args.new, temperature=temperature,
                                  eos_token_id=None, prompt_bucket=args.prompt)
        key = jax.random.PRNGKey(0)

        def ours():
            return np.asarray(generate(model, variables, batch, key, sampling).tokens)

        def theirs():
            with torch.no_grad():
                # No top-k / top-p when sampling (transformers' default top_k is 50).
                sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                out = theirs_model.generate(
                    torch_ids, attention_mask=torch_mask, max_new_tokens=args.new,
                    min_new_tokens=args.new, pad_token_id=0,
                    **(sample if temperature > 0 else dict(do_sample=False)))
            return out[:, args.prompt:].numpy()

        ours_tokens, theirs_tokens = ours(), theirs()  # compile / warm up
        times = {"ours": [], "theirs": []}
        for _ in range(args.runs):
            for name, run in (("ours", ours), ("theirs", theirs)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(t) for name, t in times.items()}
        generated = args.batch * args.new
        record = {
            "name": "generation", "mode": mode, "dims": vars(args),
            "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
            "ours_tokens_per_s": generated / median["ours"],
            "theirs_tokens_per_s": generated / median["theirs"],
            "tokens_per_s_ratio_ours_over_theirs": median["theirs"] / median["ours"],
            "ours_s": median["ours"], "theirs_s": median["theirs"],
        }
        if mode == "greedy":
            record["rows_identical"] = float(np.mean(np.all(ours_tokens == theirs_tokens, -1)))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
