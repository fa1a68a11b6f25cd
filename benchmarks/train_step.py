"""SFT train step (forward, backward, AdamW) of our LLaMA vs transformers' LlamaForCausalLM.

Same dims, same batch, float32, one process, runs alternated; prints one JSON object a line:
the median step time of each, the ratio ours/theirs, FLOPs and the share of this machine's
measured matmul ceiling that each reaches.

    python -m benchmarks.train_step [--layers 8 --hidden 512 --heads 8 --length 512 --batch 4]
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
import torch
import transformers

from rlaif_jax.checkpoints.hf import llama_config_to_hf
from rlaif_jax.models.flops import llama_train_step_flops
from rlaif_jax.models.llama import Llama, LlamaConfig


def matmul_ceiling_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best observed float32 matmul rate of this machine through XLA (FLOP/s)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def shifted_cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels[:, 1:]).mean()


def make_ours(config: LlamaConfig, input_ids):
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), input_ids)["params"]
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    optimizer = optax.adamw(1e-4)
    state = (params, optimizer.init(params))

    @jax.jit
    def step(state, ids):
        params, opt_state = state

        def loss_fn(p):
            return shifted_cross_entropy(model.apply({"params": p}, ids).logits, ids)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    holder = {"state": state}

    def run():
        holder["state"], loss = step(holder["state"], input_ids)
        loss.block_until_ready()

    return run


def make_theirs(config: LlamaConfig, input_ids):
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**llama_config_to_hf(config))
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)

    def run():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                         num_layers=args.layers, num_heads=args.heads)
    input_ids = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.length),
                                                  dtype=np.int32)
    ours, theirs = make_ours(config, jnp.asarray(input_ids)), make_theirs(config, input_ids)
    ours(), theirs()  # compile / warm up
    times = {"ours": [], "theirs": []}
    for _ in range(args.runs):
        for name, run in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    flops = llama_train_step_flops(config, args.batch, args.length)
    ceiling = matmul_ceiling_flops()
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "name": "sft_train_step", "dims": vars(args), "torch_threads": torch.get_num_threads(),
        "ours_s": median["ours"], "theirs_s": median["theirs"],
        "ratio_ours_over_theirs": median["ours"] / median["theirs"],
        "flops_per_step": flops, "matmul_ceiling_flops": ceiling,
        "ours_share_of_ceiling": flops / median["ours"] / ceiling,
        "theirs_share_of_ceiling": flops / median["theirs"] / ceiling,
    }))


if __name__ == "__main__":
    main()
