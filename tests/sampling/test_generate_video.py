"""The sampler on the video LLM: decode logits equal a teacher-forced full forward at every
position, log-probs recompute, and precomputed video tokens give the same outputs as frames."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

video_llm = pytest.importorskip(
    "rlaif_jax.models.video_llm", reason="the video LLM (issue 3) is not on this branch yet")

from rlaif_jax.models.clip_vision import ClipVisionConfig  # noqa: E402
from rlaif_jax.models.llama import LlamaConfig  # noqa: E402
from rlaif_jax.sampling.generate import (SamplingConfig, VideoDecoder, decoder_for,  # noqa: E402
                                        generate, left_pad_to, sequence_logprobs)
from tests.support import assert_close_scaled

VOCAB, IMAGE_ID, FRAMES, SIZE = 97, 97, 3, 28


@pytest.fixture(scope="module")
def tiny_video_llm():
    config = video_llm.VideoLLMConfig(
        vision=ClipVisionConfig(image_size=SIZE, patch_size=14, hidden_size=32,
                                intermediate_size=64, num_layers=2, num_heads=2),
        llm=LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=256),
        num_frames=FRAMES, image_token_id=IMAGE_ID)
    model = video_llm.VideoLLM(config)
    frames = jnp.zeros((1, FRAMES, SIZE, SIZE, 3), jnp.uint8)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32),
                                    frames=frames, has_video=jnp.ones((1,), bool))
    # Larger weights than the init's so that logits are not all near zero.
    variables = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, variables)
    return model, variables


def _video_batch(seed=0):
    """Three left-padded prompts: two with the placeholder (one long, one short), one text only."""
    rng = np.random.default_rng(seed)
    rows = [[1, 5, IMAGE_ID] + list(rng.integers(3, VOCAB, 6)),
            [1, IMAGE_ID] + list(rng.integers(3, VOCAB, 2)),
            [1] + list(rng.integers(3, VOCAB, 5))]
    length = max(map(len, rows))
    ids = np.zeros((3, length), np.int32)
    mask = np.zeros((3, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    frames = rng.integers(0, 256, (3, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    return {"input_ids": ids, "attention_mask": mask, "frames": frames,
            "has_video": np.array([True, True, False])}


def encode(model, variables, frames):
    return jax.jit(lambda v, f: model.apply(v, f, method="encode_video"))(variables, frames)


class RecordingVideoDecoder(VideoDecoder):
    """Sends every decode-step logit row to the host, keyed by its cache slot."""

    records = {}

    def run_llm(self, variables, **kwargs):
        out = super().run_llm(variables, **kwargs)
        if out.logits is not None:  # decode steps (the prefill computes no logits)
            jax.debug.callback(
                lambda slot, logits: RecordingVideoDecoder.records.__setitem__(int(slot),
                                                                               np.asarray(logits)),
                kwargs["cache_index"], out.logits[:, 0])
        return out

    def logits(self, variables, hidden):
        out = super().logits(variables, hidden)
        jax.debug.callback(
            lambda logits: RecordingVideoDecoder.records.__setitem__(-1, np.asarray(logits)),
            out[:, 0])
        return out


def test_decode_logits_equal_teacher_forced_forward(tiny_video_llm):
    model, variables = tiny_video_llm
    assert isinstance(decoder_for(model), VideoDecoder)
    batch = _video_batch()
    new, n = 6, 2
    sampling = SamplingConfig(max_new_tokens=new, temperature=1.0, num_samples=n,
                              eos_token_id=None, prompt_bucket=16)
    RecordingVideoDecoder.records.clear()
    gen = generate(RecordingVideoDecoder(model), variables, batch, jax.random.PRNGKey(1), sampling)
    jax.effects_barrier()
    records = RecordingVideoDecoder.records
    # Prefill's last logits (the first token's), then one entry per decode step, by cache slot.
    slots = sorted(k for k in records if k >= 0)
    assert len(slots) == new - 1
    decode_logits = np.stack([np.repeat(records[-1], n, 0)] + [records[s] for s in slots], 1)

    # Teacher forcing: the video LLM's own forward over [prompt | sampled tokens] (bucketed as
    # generate did), logits aligned with input_ids, read where each token was predicted.
    ids, mask = left_pad_to(batch["input_ids"], batch["attention_mask"], 16, 0)
    video_tokens = encode(model, variables, batch["frames"])
    full_ids = jnp.concatenate([jnp.repeat(ids, n, 0), gen.tokens], 1)
    full_mask = jnp.concatenate([jnp.repeat(mask, n, 0), gen.mask], 1)
    full = jax.jit(model.apply)(variables, full_ids, full_mask,
                                video_tokens=jnp.repeat(video_tokens, n, 0),
                                has_video=jnp.repeat(jnp.asarray(batch["has_video"]), n, 0)).logits
    teacher = np.asarray(full[:, 15:15 + new])
    assert_close_scaled(decode_logits, teacher)
    assert np.max(np.abs(teacher)) > 1.0  # logits of a real size, so the tolerance means something

    recomputed = sequence_logprobs(model, variables, {**batch, "input_ids": ids,
                                                      "attention_mask": mask},
                                   gen, n, 1.0, video_tokens=video_tokens)
    np.testing.assert_allclose(gen.logprobs, recomputed, rtol=1e-5, atol=1e-5)


def test_precomputed_video_tokens_match_frames(tiny_video_llm):
    model, variables = tiny_video_llm
    batch = _video_batch(seed=1)
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.0, num_samples=2,
                              eos_token_id=None, prompt_bucket=16)
    from_frames = generate(model, variables, batch, jax.random.PRNGKey(0), sampling)
    video_tokens = encode(model, variables, batch["frames"])
    text_only = {k: v for k, v in batch.items() if k != "frames"}
    reused = generate(model, variables, text_only, jax.random.PRNGKey(0), sampling,
                      video_tokens=video_tokens)
    np.testing.assert_array_equal(from_frames.tokens, reused.tokens)
    np.testing.assert_allclose(from_frames.logprobs, reused.logprobs, rtol=1e-6, atol=1e-6)
    # The video matters: other frames change the continuation of the video rows only.
    other = generate(model, variables, {**batch, "frames": batch["frames"][::-1]},
                     jax.random.PRNGKey(0), sampling)
    assert not np.allclose(np.asarray(other.logprobs)[:4], np.asarray(from_frames.logprobs)[:4])
    np.testing.assert_array_equal(np.asarray(other.tokens)[4:], np.asarray(from_frames.tokens)[4:])
