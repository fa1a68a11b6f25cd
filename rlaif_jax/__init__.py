"""rlaif_jax: VLM-RLAIF (RL from AI feedback for video LLMs) in JAX/Flax."""

__all__ = ["from_pretrained", "save_pretrained", "tokenizer_path"]


def __getattr__(name):
    # The public functions load on first use, so importing a submodule (rlaif_jax.models.llama)
    # does not pull in checkpoint loading and everything below it.
    if name in __all__:
        from rlaif_jax import api
        return getattr(api, name)
    raise AttributeError(f"module 'rlaif_jax' has no attribute {name!r}")
