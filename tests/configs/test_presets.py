"""Model presets: shapes of docs/method.md, parameter counts equal to transformers' models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import models
from rlaif_jax.checkpoints.hf import abstract_params, llama_config_to_hf
from rlaif_jax.models.llama import Llama, LlamaConfig


def count_ours(config: LlamaConfig) -> int:
    abstract = abstract_params(Llama(config), jnp.zeros((1, 1), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))


def count_transformers(config: LlamaConfig) -> int:
    hf_config = transformers.LlamaConfig(**llama_config_to_hf(config))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,billions", [("vicuna7b", 6.74), ("vicuna13b", 13.02)])
def test_parameter_count_matches_transformers(preset, billions):
    config = LlamaConfig.from_dict(models.get_config(preset))
    ours = count_ours(config)
    assert ours == count_transformers(config)
    assert abs(ours / 1e9 - billions) < 0.01


def test_presets_have_spec_shapes():
    seven = LlamaConfig.from_dict(models.get_config("vicuna7b"))
    thirteen = LlamaConfig.from_dict(models.get_config("vicuna13b"))
    assert (seven.num_layers, seven.hidden_size, seven.num_heads, seven.intermediate_size,
            seven.vocab_size) == (32, 4096, 32, 11008, 32000)
    assert (thirteen.num_layers, thirteen.hidden_size, thirteen.num_heads,
            thirteen.intermediate_size) == (40, 5120, 40, 13824)
    assert seven.rms_norm_eps == 1e-5 and seven.rope_theta == 1e4


def test_unknown_model_key_is_named():
    values = models.get_config("tiny").to_dict()
    values["hiden_size"] = 3
    with pytest.raises(ValueError, match="hiden_size"):
        LlamaConfig.from_dict(values)
