"""A tiny random video LLM with a reward head, and random preference batches, for RM tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.models.clip_vision import ClipVisionConfig
from rlaif_jax.models.llama import LlamaConfig
from rlaif_jax.models.lora import LoraConfig
from rlaif_jax.models.video_llm import VideoLLM, VideoLLMConfig

VOCAB = 96
IMAGE_ID = VOCAB  # the first id past the vocabulary
FRAMES, SIZE = 2, 32


def tiny_video_config(lora_rank: int = 0, reward_head: bool = True, **llm_changes
                      ) -> VideoLLMConfig:
    vision = ClipVisionConfig(image_size=SIZE, patch_size=16, hidden_size=32,
                              intermediate_size=64, num_layers=2, num_heads=2)
    llm = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=128,
                      lora=LoraConfig(rank=lora_rank, alpha=16.0)).replace(**llm_changes)
    return VideoLLMConfig(vision=vision, llm=llm, num_frames=FRAMES, image_token_id=IMAGE_ID,
                          reward_head=reward_head)


def tiny_reward_model(lora_rank: int = 0, **changes) -> VideoLLM:
    return VideoLLM(tiny_video_config(lora_rank, **changes))


def init_fn(model):
    def init(rng):
        return model.init(rng, jnp.zeros((1, 8), jnp.int32))
    return init


def host_variables(model, seed: int = 1):
    return jax.device_get(jax.jit(lambda rng: nn.unbox(init_fn(model)(rng)))(
        jax.random.PRNGKey(seed)))


def random_preference_batch(seed: int, pairs: int = 8, length: int = 20) -> dict:
    """Right-padded candidate rows [B, 2, L] with one <image> after bos, random frames."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((pairs, 2, length), np.int32)
    mask = np.zeros((pairs, 2, length), np.int32)
    for p in range(pairs):
        for c in range(2):
            real = int(rng.integers(length // 2, length + 1))
            ids[p, c, :real] = rng.integers(3, VOCAB, size=real)
            ids[p, c, 0], ids[p, c, 1] = 1, IMAGE_ID
            mask[p, c, :real] = 1
    frames = rng.integers(0, 256, size=(pairs, FRAMES, SIZE, SIZE, 3)).astype(np.uint8)
    return {"input_ids": ids, "attention_mask": mask, "frames": frames,
            "has_video": np.ones(pairs, bool),
            "preference": rng.integers(1, 3, size=pairs).astype(np.int32)}
