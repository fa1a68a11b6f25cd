"""rlaif_jax: VLM-RLAIF (RL from AI feedback for video LLMs) in JAX/Flax."""

from rlaif_jax.api import from_pretrained, save_pretrained, tokenizer_path

__all__ = ["from_pretrained", "save_pretrained", "tokenizer_path"]
