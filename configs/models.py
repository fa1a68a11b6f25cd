"""Model presets (docs/method.md shapes). `tiny` is the default everywhere: it trains on a laptop CPU.

LLaMA presets (`tiny`, `vicuna7b`, `vicuna13b`) feed `LlamaConfig.from_dict`; CLIP presets
(`clip_tiny`, `clip_vit_l14_336`) feed `ClipVisionConfig.from_dict`; video LLM presets
(`video_tiny`, `video_llava_7b`) feed `VideoLLMConfig.from_dict` (nested `vision` and `llm`).
"""

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


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _clip(**values) -> ml_collections.ConfigDict:
    base = dict(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24,
        num_heads=16, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu",
        select_layer=-2, select_feature="patch", image_mean=CLIP_MEAN, image_std=CLIP_STD,
        dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="none")
    base.update(values)
    return ml_collections.ConfigDict(base)


def clip_tiny() -> ml_collections.ConfigDict:
    """A small ViT for the synthetic world's 64 px frames: 16 patches of 16 px, width 64."""
    return _clip(image_size=64, patch_size=16, hidden_size=64, intermediate_size=256,
                 num_layers=3, num_heads=4, dtype="float32")


def clip_vit_l14_336() -> ml_collections.ConfigDict:
    """CLIP ViT-L/14 at 336 px (docs/method.md): 576 patch tokens of 1024 per frame."""
    return _clip()


def _video(vision, llm, **values) -> ml_collections.ConfigDict:
    base = dict(vision=vision, llm=llm, projector_type="mlp2x_gelu", projector_bias=True,
                pooling="spatiotemporal", num_frames=50,
                image_token_id=None,  # None: the first id past the LLM's vocabulary
                freeze_vision=True, reward_head=False, value_head=False)
    base.update(values)
    return ml_collections.ConfigDict(base, type_safe=False)


def video_tiny() -> ml_collections.ConfigDict:
    """Tiny CLIP + mlp2x_gelu + the tiny LLaMA, 8 frames pooled to 8 + 16 = 24 video tokens."""
    return _video(clip_tiny(), tiny(), num_frames=8)


def video_llava_7b() -> ml_collections.ConfigDict:
    """CLIP-L/336 + mlp2x_gelu + Vicuna-7B, 50 frames pooled to 50 + 576 = 626 tokens."""
    return _video(clip_vit_l14_336(), vicuna7b(), num_frames=50)


PRESETS = {"tiny": tiny, "vicuna7b": vicuna7b, "vicuna13b": vicuna13b,
           "clip_tiny": clip_tiny, "clip_vit_l14_336": clip_vit_l14_336,
           "video_tiny": video_tiny, "video_llava_7b": video_llava_7b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown model preset {arg!r}; choose from {sorted(PRESETS)}")
    return PRESETS[arg]()
