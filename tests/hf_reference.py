"""Tiny random `transformers` models built and saved locally: the PyTorch reference in tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def tiny_hf_llama_config(**overrides) -> transformers.LlamaConfig:
    values = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def save_tiny_hf_llama(directory, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_hf_llama_config(**overrides)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    # Random (not zero) norm weights, so a wrong mapping of norms cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


def left_padded_batch(vocab_size: int, lengths, total: int, seed: int = 0):
    """input_ids, attention_mask (numpy int32) with rows left-padded to `total`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(3, vocab_size, n)
        mask[row, total - n:] = 1
    return ids, mask


def hf_logits(model, input_ids, attention_mask) -> np.ndarray:
    """Reference logits; positions from the mask, as `generate` computes them."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def assert_close_scaled(ours, ref, mask=None, rel: float = 1e-4):
    """DESIGN.md's forward tolerance: max |ours - ref| <= rel * max |ref| on real positions."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        ours, ref = ours[keep], ref[keep]
    err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel} * max |ref| {scale:.3e}"


def _randomize_norms(model):
    """Random (not one/zero) LayerNorm/RMSNorm weights, so a wrong mapping of norms cannot hide."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                if name.endswith("bias"):
                    param.copy_(0.1 * torch.randn_like(param))
                else:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))


def tiny_hf_clip_vision_config(**overrides) -> transformers.CLIPVisionConfig:
    values = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    values.update(overrides)
    return transformers.CLIPVisionConfig(**values)


def save_tiny_hf_clip_vision(directory, seed: int = 0, **overrides) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    config = tiny_hf_clip_vision_config(**overrides)
    config._attn_implementation = "eager"
    model = transformers.CLIPVisionModel(config).eval()
    _randomize_norms(model)
    model.save_pretrained(directory)
    return model


# Head size 64 as in every OpenAI CLIP ViT (original LLaVA configs do not name the head count).
TINY_LLAVA_VISION = dict(hidden_size=128, num_attention_heads=2, intermediate_size=160,
                         num_hidden_layers=2)


def save_tiny_hf_llava(directory, seed: int = 0, image_token_index: int = 96, vision=None,
                       **text_overrides) -> transformers.LlavaForConditionalGeneration:
    """A tiny LlavaForConditionalGeneration whose placeholder id sits inside the vocabulary."""
    torch.manual_seed(seed)
    text = tiny_hf_llama_config(**text_overrides).to_dict()
    vision = dict(TINY_LLAVA_VISION, **(vision or {}))
    config = transformers.LlavaConfig(
        vision_config=tiny_hf_clip_vision_config(**vision).to_dict(), text_config=text,
        image_token_index=image_token_index, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config._attn_implementation = "eager"
    model = transformers.LlavaForConditionalGeneration(config).eval()
    _randomize_norms(model)
    model.save_pretrained(directory)
    return model


def random_frames(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def clip_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> CLIPImageProcessor's normalisation, NCHW float32."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    pixels = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
