"""The video LLM: CLIP on every frame -> projector -> pooling -> spliced into the LLaMA prompt.

Frames [B, T, H, W, 3] (uint8, already resized) are folded into the batch for the vision tower,
projected to the LLM's width, then pooled (docs/method.md):

- `spatiotemporal`: features (T, P, H) -> T temporal tokens (mean over the P patches of each
  frame) followed by P spatial tokens (mean over the T frames of each patch): N = T + P.
- `none`: all T * P tokens in frame order (for one image this is LLaVA): N = T * P.

The N video tokens replace each row's single `<image>` placeholder (`config.image_token_id`)
with static shapes: the expanded sequence has length L + N - 1 for every row. For a row with
video, tokens before the placeholder keep their index, the video fills [p, p + N) and later
tokens shift by N - 1; a row without video shifts right by N - 1, so its N - 1 extra pad slots
are at the front (left-padded prompts stay left-padded). Positions come from the expanded mask.
Outputs are gathered back so they are ALIGNED WITH input_ids: the output at the placeholder's
index is read at the last video token (it predicts the token after the placeholder), so losses
written for plain LLaMA work unchanged.

Bad token ids cannot raise inside jit (and a JAX gather clamps an out-of-range id silently), so
`validate_batch` checks a batch on the host: data loaders and tests call it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.models.clip_vision import ClipVision, ClipVisionConfig
from rlaif_jax.models.config_base import ModelConfig
from rlaif_jax.models.heads import RewardHead, ValueHead
from rlaif_jax.models.llama import Llama, LlamaConfig
from rlaif_jax.models.projector import Projector, projector_depth

POOLINGS = ("spatiotemporal", "none")
# The reference code marks the placeholder with this out-of-vocabulary id; map it to
# `config.image_token_id` (see `map_reference_image_token`) before a batch reaches the model.
REFERENCE_IMAGE_TOKEN_ID = -200


@dataclasses.dataclass(frozen=True)
class VideoLLMConfig(ModelConfig):
    _name = "video LLM"

    vision: ClipVisionConfig = ClipVisionConfig()
    llm: LlamaConfig = LlamaConfig()
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    pooling: str = "spatiotemporal"
    num_frames: int = 50  # frames a video is sampled to by the data layer
    # The <image> placeholder; may lie past the vocabulary. None (e.g. in a preset) resolves to
    # llm.vocab_size, the first id past the vocabulary, when the config is built.
    image_token_id: Optional[int] = 32000
    freeze_vision: bool = True  # no gradient through CLIP (docs/method.md: the tower is frozen)
    reward_head: bool = False
    value_head: bool = False

    def __post_init__(self):
        if self.image_token_id is None:
            object.__setattr__(self, "image_token_id", self.llm.vocab_size)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {POOLINGS}")
        projector_depth(self.projector_type)  # raises on an unknown type
        if self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames}: need at least one frame")
        if 0 <= self.image_token_id < self.llm.vocab_size and self.image_token_id in (
                self.llm.pad_token_id, self.llm.bos_token_id, self.llm.eos_token_id):
            raise ValueError(f"image_token_id={self.image_token_id} collides with pad/bos/eos")

    @property
    def num_video_tokens(self) -> int:
        return num_video_tokens(self, self.num_frames)

    @classmethod
    def from_dict(cls, values) -> "VideoLLMConfig":
        """From a plain dict or ConfigDict with nested `vision` and `llm`; unknown keys fail."""
        values = cls.checked_values(values)
        if "vision" in values and not isinstance(values["vision"], ClipVisionConfig):
            values["vision"] = ClipVisionConfig.from_dict(values["vision"])
        if "llm" in values and not isinstance(values["llm"], LlamaConfig):
            values["llm"] = LlamaConfig.from_dict(values["llm"])
        return cls(**values)


def num_video_tokens(config: VideoLLMConfig, num_frames: int) -> int:
    """N, the tokens one video of `num_frames` frames becomes."""
    per_frame = config.vision.num_features
    if config.pooling == "spatiotemporal":
        return num_frames + per_frame
    return num_frames * per_frame


@flax.struct.dataclass
class VideoLLMOutput:
    logits: Optional[jax.Array]  # [B, L, V] float32, aligned with input_ids
    last_hidden_state: jax.Array  # [B, L, H], aligned with input_ids
    reward: Optional[jax.Array] = None  # [B] at the last real token (config.reward_head)
    values: Optional[jax.Array] = None  # [B, L] aligned with input_ids (config.value_head)
    # With return_expanded: the sequence the LLM saw, [B, L + N - 1, ...].
    expanded_attention_mask: Optional[jax.Array] = None
    expanded_last_hidden_state: Optional[jax.Array] = None
    expanded_logits: Optional[jax.Array] = None
    text_positions: Optional[jax.Array] = None  # [B, L]: slot of each input token


def pool_video_tokens(tokens: jax.Array, pooling: str) -> jax.Array:
    """tokens [B, T, P, H] -> [B, N, H] (docs/method.md); means in float32."""
    batch, frames, patches, width = tokens.shape
    if pooling == "spatiotemporal":
        t32 = tokens.astype(jnp.float32)
        temporal = jnp.mean(t32, axis=2)  # [B, T, H]: each frame, averaged over space
        spatial = jnp.mean(t32, axis=1)  # [B, P, H]: each patch, averaged over time
        return jnp.concatenate([temporal, spatial], axis=1).astype(tokens.dtype)
    if pooling == "none":
        return tokens.reshape(batch, frames * patches, width)
    raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS}")


def splice_video_tokens(text_embeds: jax.Array, attention_mask: jax.Array,
                        is_placeholder: jax.Array, video_tokens: jax.Array,
                        has_video: jax.Array):
    """Replaces each row's placeholder by its N video tokens, with static shapes.

    text_embeds [B, L, H], attention_mask [B, L], is_placeholder [B, L] bool, video_tokens
    [B, N, H], has_video [B] bool -> (embeds [B, L+N-1, H], mask [B, L+N-1], text_positions [B, L]).
    A row uses its video only if it has one AND a placeholder (`validate_batch` rejects the other
    cases on the host; inside jit a placeholder-less video row degrades to text-only).
    """
    batch, length, _ = text_embeds.shape
    n = video_tokens.shape[1]
    use_video = has_video.astype(bool) & jnp.any(is_placeholder, axis=-1)
    start = jnp.where(use_video, jnp.argmax(is_placeholder, axis=-1), 0)[:, None]  # [B, 1]
    t = jnp.arange(length)[None]
    text_positions = (t + (n - 1) * (t >= start)).astype(jnp.int32)
    slots = jnp.arange(length + n - 1)[None]  # [1, E]
    in_video = use_video[:, None] & (slots >= start) & (slots < start + n)
    source = jnp.where(slots < start, slots, slots - (n - 1))  # text token a slot holds
    from_text = ~in_video & (source >= 0)
    source = jnp.clip(source, 0, length - 1)
    text_part = jnp.take_along_axis(text_embeds, source[..., None], axis=1)
    video_index = jnp.clip(slots - start, 0, n - 1)
    video_part = jnp.take_along_axis(
        video_tokens.astype(text_embeds.dtype), video_index[..., None], axis=1)
    embeds = jnp.where(in_video[..., None], video_part,
                       jnp.where(from_text[..., None], text_part, jnp.zeros_like(text_part)))
    mask = jnp.where(in_video, 1,
                     jnp.where(from_text, jnp.take_along_axis(attention_mask, source, axis=1), 0))
    return embeds, mask.astype(attention_mask.dtype), text_positions


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, E, ...] at positions [B, L] -> [B, L, ...]."""
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


class VideoLLM(nn.Module):
    config: VideoLLMConfig

    def setup(self):
        cfg = self.config
        self.vision = ClipVision(cfg.vision)
        self.projector = Projector(cfg.projector_type, cfg.llm.hidden_size,
                                   use_bias=cfg.projector_bias, dtype=cfg.llm.compute_dtype,
                                   param_dtype=cfg.llm.weight_dtype)
        self.llm = Llama(cfg.llm)
        head = dict(dtype=cfg.llm.compute_dtype, param_dtype=cfg.llm.weight_dtype)
        if cfg.reward_head:
            self.reward_head = RewardHead(**head)
        if cfg.value_head:
            self.value_head = ValueHead(**head)

    def encode_video(self, frames: jax.Array) -> jax.Array:
        """uint8 frames [B, T, H, W, 3] -> pooled video tokens [B, N, H] (CLIP, projector, pool).

        Compute once per batch and pass as `video_tokens=` to later calls.
        """
        cfg = self.config
        if frames.ndim != 5:
            raise ValueError(f"frames must be [B, T, H, W, 3], got shape {tuple(frames.shape)}")
        batch, num_frames = frames.shape[:2]
        features = self.vision(frames.reshape((batch * num_frames,) + frames.shape[2:])).features
        if cfg.freeze_vision:
            features = jax.lax.stop_gradient(features)
        tokens = self.projector(features)
        tokens = tokens.reshape(batch, num_frames, tokens.shape[1], tokens.shape[2])
        tokens = pool_video_tokens(tokens, cfg.pooling).astype(cfg.llm.compute_dtype)
        return nn.with_logical_constraint(tokens, ("act_batch", "act_length", "act_embed"))

    def prepare_inputs(self, input_ids: jax.Array, attention_mask: jax.Array,
                       video_tokens: Optional[jax.Array] = None,
                       has_video: Optional[jax.Array] = None):
        """-> (inputs_embeds [B, L+N-1, H], attention_mask [B, L+N-1], text_positions [B, L]).

        The placeholder is swapped out before the embedding lookup, so its id may lie past the
        vocabulary. Without video tokens the sequence is the text alone (N = 1).
        """
        cfg = self.config
        batch, length = input_ids.shape
        is_placeholder = input_ids == cfg.image_token_id
        text_embeds = self.llm.embed(jnp.where(is_placeholder, cfg.llm.pad_token_id, input_ids))
        if video_tokens is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            return text_embeds, attention_mask, positions
        if has_video is None:
            has_video = jnp.ones((batch,), bool)
        return splice_video_tokens(text_embeds, attention_mask, is_placeholder, video_tokens,
                                   has_video)

    def run_llm(self, **kwargs):
        """The LLaMA forward on prepared inputs (e.g. a KV-cache prefill or decode step)."""
        return self.llm(**kwargs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.logits(hidden)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: Optional[jax.Array] = None,
        frames: Optional[jax.Array] = None,
        has_video: Optional[jax.Array] = None,
        video_tokens: Optional[jax.Array] = None,
        compute_logits: bool = True,
        return_expanded: bool = False,
    ) -> VideoLLMOutput:
        cfg = self.config
        batch, _ = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if video_tokens is None and frames is not None:
            video_tokens = self.encode_video(frames)
        elif video_tokens is None and self.is_initializing():
            # Create the vision and projector params even when init sees text only.
            size = cfg.vision.image_size
            self.encode_video(jnp.zeros((1, 1, size, size, cfg.vision.num_channels), jnp.uint8))
        compute_logits = compute_logits or self.is_initializing()

        embeds, mask, text_positions = self.prepare_inputs(
            input_ids, attention_mask, video_tokens, has_video)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, compute_logits=False)
        hidden = gather_positions(out.last_hidden_state, text_positions)
        logits = self.llm.logits(hidden) if compute_logits else None
        reward = self.reward_head(hidden, attention_mask) if cfg.reward_head else None
        values = self.value_head(hidden) if cfg.value_head else None
        expanded = {}
        if return_expanded:
            expanded = dict(
                expanded_attention_mask=mask,
                expanded_last_hidden_state=out.last_hidden_state,
                expanded_logits=self.llm.logits(out.last_hidden_state) if compute_logits else None,
                text_positions=text_positions)
        return VideoLLMOutput(logits=logits, last_hidden_state=hidden, reward=reward,
                              values=values, **expanded)

    def target_log_probs(self, hidden: jax.Array, targets: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
        """The LLM's `target_log_probs` on text-position hidden states (`last_hidden_state`)."""
        return self.llm.target_log_probs(hidden, targets)


# ---------------------------------------------------------------------------------------------
# Host-side checks (jitted code cannot raise on values)


def is_video_model(model) -> bool:
    """Whether `model` takes videos (a VideoLLM, or a wrapper of one that encodes videos)."""
    return hasattr(model, "encode_video")


class BatchError(ValueError):
    """A batch the model would silently mis-read; the message names the row and the problem."""


def map_reference_image_token(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """The reference's -200 placeholder -> `image_token_id` (host side, numpy)."""
    input_ids = np.asarray(input_ids)
    return np.where(input_ids == REFERENCE_IMAGE_TOKEN_ID, image_token_id, input_ids)


def validate_batch(batch: dict, config: VideoLLMConfig) -> None:
    """Raises BatchError for what jitted code would get wrong without a word.

    - a token id outside [0, vocab_size) other than the placeholder (a JAX gather clamps it);
    - more than one placeholder in a row, or a placeholder on a padding slot;
    - more placeholders than videos (a placeholder in a row whose `has_video` is False or that
      has no frames), or a video row without a placeholder (its video would be dropped);
    - frames not [B, T, image_size, image_size, 3].
    """
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise BatchError(f"input_ids must be [B, L], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise BatchError(f"input_ids must be integers, got {ids.dtype}")
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    vocab, image_id = config.llm.vocab_size, config.image_token_id
    placeholder = ids == image_id
    bad = ((ids < 0) | (ids >= vocab)) & ~placeholder
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        token = int(ids[row, col])
        hint = ""
        if token == REFERENCE_IMAGE_TOKEN_ID:
            hint = (f" (the reference's <image> id: map it to image_token_id={image_id} with "
                    "map_reference_image_token)")
        raise BatchError(
            f"row {row}, position {col}: token id {token} is outside the vocabulary "
            f"[0, {vocab}) and is not the <image> id {image_id}{hint}; a JAX gather would "
            f"silently clamp it to a wrong token ({int(bad.sum())} such ids in the batch)")
    counts = placeholder.sum(axis=1)
    if (counts > 1).any():
        row = int(np.argmax(counts > 1))
        raise BatchError(f"row {row} has {int(counts[row])} <image> placeholders; at most one "
                         "per row (one video per prompt)")
    on_pad = placeholder & (mask == 0)
    if on_pad.any():
        row = int(np.argwhere(on_pad)[0, 0])
        raise BatchError(f"row {row}: the <image> placeholder sits on a padding slot (mask 0)")

    frames = batch.get("frames")
    if frames is None:
        has_video = np.zeros(ids.shape[0], bool)
    else:
        has_video = np.asarray(batch.get("has_video", np.ones(ids.shape[0], bool))).astype(bool)
        size, channels = config.vision.image_size, config.vision.num_channels
        shape = tuple(np.shape(frames))
        if len(shape) != 5 or shape[0] != ids.shape[0] or shape[2:] != (size, size, channels):
            raise BatchError(f"frames must be [B={ids.shape[0]}, T, {size}, {size}, {channels}] "
                             f"(resized by the data layer), got {shape}")
    orphan = (counts == 1) & ~has_video
    if orphan.any():
        row = int(np.argmax(orphan))
        raise BatchError(
            f"more <image> placeholders ({int(counts.sum())}) than videos "
            f"({int(has_video.sum())}): row {row} has a placeholder but no video")
    missing = has_video & (counts == 0)
    if missing.any():
        row = int(np.argmax(missing))
        raise BatchError(f"row {row} has a video but no <image> placeholder; its video would be "
                         "dropped")
