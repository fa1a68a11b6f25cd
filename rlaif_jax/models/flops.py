"""FLOP counts of the LLaMA forward and train step, so any run can print MFU directly.

Counts matmul FLOPs only (2 per multiply-add), the standard for MFU: elementwise work, norms
and softmax are noise at these sizes. A train step is forward + backward = 3x forward.
"""

from __future__ import annotations

from rlaif_jax.models.llama import LlamaConfig


def llama_forward_flops(config: LlamaConfig, batch: int, length: int,
                        with_logits: bool = True) -> float:
    tokens = batch * length
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads, config.kv_heads,
                                         config.dim_per_head)
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o + k, v
    mlp = 3 * hidden * config.intermediate_size
    per_layer = 2 * tokens * (projections + mlp)
    # scores q.k and the weighted sum of v: each 2 * L^2 * head_dim per head, causal not discounted
    per_layer += 2 * 2 * batch * length * length * heads * head_dim
    flops = config.num_layers * per_layer
    if with_logits:
        flops += 2 * tokens * hidden * config.vocab_size
    return float(flops)


def llama_train_step_flops(config: LlamaConfig, batch: int, length: int) -> float:
    return 3.0 * llama_forward_flops(config, batch, length)
