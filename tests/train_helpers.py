"""Shared pieces for the training tests: a tiny random LLaMA and random SFT batches."""

import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.models.lora import LoraConfig

IGNORE = -100


def tiny_llama(lora_rank: int = 0, **changes) -> Llama:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                         lora=LoraConfig(rank=lora_rank, alpha=16.0))
    return Llama(config.replace(**changes))


def init_variables_fn(model: Llama, length: int = 16):
    def init(rng):
        return model.init(rng, jnp.zeros((1, length), jnp.int32))
    return init


def random_sft_batch(seed: int, batch: int = 8, length: int = 16, vocab: int = 128) -> dict:
    """Right-padded rows: a prompt (no loss), an answer (loss), then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    labels = np.full((batch, length), IGNORE, np.int32)
    for row in range(batch):
        real = rng.integers(length // 2, length + 1)
        prompt = rng.integers(2, real - 1)
        mask[row, :real] = 1
        ids[row, real:] = 0
        labels[row, prompt:real] = ids[row, prompt:real]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
