"""rlaif_jax: VLM-RLAIF (RL from AI feedback for video LLMs) in JAX/Flax."""

from rlaif_jax.api import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
