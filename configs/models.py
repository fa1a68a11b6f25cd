"""Model presets (SPEC.md shapes). `tiny` is the default everywhere: it trains on a laptop CPU."""

import ml_collections


def _llama(**values) -> ml_collections.ConfigDict:
    base = dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=None, head_dim=None, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling_factor=1.0, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16", param_dtype="float32",
        scan_layers=True, remat_policy="none",
        lora=dict(rank=0, alpha=16.0,
                  targets="(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
    )
    base.update(values)
    # num_kv_heads / head_dim may be None or int: let the type be set once.
    return ml_collections.ConfigDict(base, type_safe=False)


def tiny() -> ml_collections.ConfigDict:
    """A few-million-parameter LLaMA for the synthetic world (vocab set by its tokenizer)."""
    return _llama(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=4,
                  num_heads=4, max_position_embeddings=1024, dtype="float32")


def vicuna7b() -> ml_collections.ConfigDict:
    return _llama(remat_policy="dots_no_batch")


def vicuna13b() -> ml_collections.ConfigDict:
    return _llama(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                  remat_policy="dots_no_batch")


PRESETS = {"tiny": tiny, "vicuna7b": vicuna7b, "vicuna13b": vicuna13b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown model preset {arg!r}; choose from {sorted(PRESETS)}")
    return PRESETS[arg]()
