"""SFT train step (forward, backward, AdamW) of our LLaMA vs transformers' LlamaForCausalLM.

Same dims, same batch, same initial weights (ours are loaded from theirs), float32, one process,
runs alternated; prints one JSON object a line: the median step time of each, the ratio
ours/theirs, FLOPs and the share of this machine's measured matmul ceiling that each reaches.
With --profile also where each step's time goes (benchmarks/profile.py).

    python -m benchmarks.train_step [--layers 8 --hidden 512 --heads 8 --length 512 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import rlaif_jax
from benchmarks.common import (add_llama_dims, add_train_step_layout, alternate,
                               fastest_torch_threads, machine, matmul_ceiling_flops)
from benchmarks.profile import jax_breakdown, rounded, torch_breakdown
from rlaif_jax.models.flops import llama_train_step_flops
from rlaif_jax.sft.loss import model_token_cross_entropy


def next_token_loss(model, variables, ids, labels=None, frames=None):
    """Mean next-token cross entropy (transformers' shift: the output at t predicts ids[t + 1])
    through the library's SFT loss, i.e. the model's fused LM head and log-probability
    (`rlaif_jax/sft/loss.py: model_token_cross_entropy`). `labels` default to the ids."""
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
             "labels": ids if labels is None else labels}
    if frames is not None:
        batch["frames"] = frames
    sums = model_token_cross_entropy(model, variables, batch)
    return sums["loss"] / sums["weight"]


def adamw_step(loss_fn, optimizer):
    """A jitted (params, opt_state), batch -> new state, loss; the state is donated."""

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


class Stepper:
    """Holds the state of a compiled step and runs it on a fixed batch."""

    def __init__(self, step, params, optimizer, batch):
        state = (params, optimizer.init(params))
        self.compiled = step.lower(state, batch).compile()
        self.state, self.batch = state, batch

    def __call__(self):
        self.state, loss = self.compiled(self.state, self.batch)
        loss.block_until_ready()


def hf_llama(args) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=int(args.hidden * 8 / 3) // 8 * 8, num_attention_heads=args.heads,
        max_position_embeddings=max(args.length, 64), pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).train()


def make_theirs(model, input_ids):
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


def make_ours(theirs_model, input_ids, scan_layers: bool = False,
              attention_block: int = 0) -> Stepper:
    with tempfile.TemporaryDirectory() as directory:
        theirs_model.save_pretrained(directory)
        model, params = rlaif_jax.from_pretrained(directory, dtype="float32",
                                                  scan_layers=scan_layers,
                                                  attention_block=attention_block)
    optimizer = optax.adamw(1e-4)

    def loss_fn(params, ids):
        return next_token_loss(model, {"params": params}, ids)

    return Stepper(adamw_step(loss_fn, optimizer), params, optimizer, jnp.asarray(input_ids))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_llama_dims(p, runs=5)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    add_train_step_layout(p)
    p.add_argument("--profile", action="store_true", help="also print where the time goes")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    input_ids = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.length),
                                                  dtype=np.int32)
    theirs_model = hf_llama(args)
    ours = make_ours(theirs_model, input_ids, bool(args.scan_layers), args.attention_block)
    theirs = make_theirs(theirs_model, input_ids)
    probe = fastest_torch_threads(theirs)  # torch's faster thread count (common.py says why)
    times = alternate({"ours": ours, "theirs": theirs}, args.runs)
    config = rlaif_jax.models.llama.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.heads, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8)
    flops = llama_train_step_flops(config, args.batch, args.length)
    ceiling = matmul_ceiling_flops()
    ours_s, theirs_s = times["ours"]["wall_s"], times["theirs"]["wall_s"]
    record = {
        "name": "sft_train_step", "dims": vars(args), **machine(),
        "torch_thread_probe_s": probe,
        "ours_s": round(ours_s, 4), "theirs_s": round(theirs_s, 4),
        "ratio_ours_over_theirs": round(ours_s / theirs_s, 3),
        "cpu_ratio_ours_over_theirs": round(times["ours"]["cpu_s"] / times["theirs"]["cpu_s"], 3),
        "ours_wall_all_s": times["ours"]["wall_all_s"],
        "theirs_wall_all_s": times["theirs"]["wall_all_s"],
        "flops_per_step": flops, "matmul_ceiling_flops": round(ceiling),
        "ours_tflops": round(flops / ours_s / 1e12, 4),
        "ours_share_of_ceiling": round(flops / ours_s / ceiling, 3),
        "theirs_share_of_ceiling": round(flops / theirs_s / ceiling, 3),
    }
    print(json.dumps(record), flush=True)
    if args.profile:
        print(json.dumps({
            "name": "sft_train_step_profile", "dims": vars(args),
            "ours_s_by_part": rounded(jax_breakdown(ours.compiled, ours)),
            "theirs_s_by_op": rounded(torch_breakdown(theirs, args.vocab)),
        }), flush=True)


if __name__ == "__main__":
    main()
