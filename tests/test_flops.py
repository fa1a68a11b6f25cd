"""FLOP accounting agrees with XLA's own count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest

from rlaif_jax.models.flops import llama_forward_flops
from rlaif_jax.models.llama import Llama, LlamaConfig


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_forward_flops_match_xla_cost_analysis(kv_heads):
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2,
                         num_heads=4, num_kv_heads=kv_heads, scan_layers=False)
    model = Llama(config)
    ids = jnp.zeros((2, 64), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x).logits).lower(params, ids).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = llama_forward_flops(config, 2, 64)
    assert abs(cost["flops"] - ours) / ours < 0.05, (cost["flops"], ours)
