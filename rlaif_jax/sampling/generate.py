"""KV-cache sampling under jit: prefill a left-padded prompt batch, then decode in one loop.

Shape of one call (B prompts, n samples each, P prompt slots after bucketing, T new tokens):

1. Prefill: the B prompts run once through the decoder, writing a KV cache of P slots. Positions
   come from the padding mask, so left padding is invisible to the model.
2. The prefill cache (and its last logits) are repeated n times along the batch axis: sample j of
   prompt i is row i * n + j, and the prompt, its video tokens included, is never recomputed.
   The decode cache [layers, B * n, P + T - 1, kv_heads, head_dim] is allocated once per call and
   sharded over the mesh's batch axes (heads over 'tensor').
3. Decode: one `lax.while_loop` whose carry holds the cache, the token / log-prob / mask buffers,
   the done flags, the RNG and the step. Step t feeds token t-1 at cache slot P + t - 1 (the
   layers write it with `dynamic_update_slice` into the carried buffer, in place) at position
   (the row's real prompt length) + t - 1, and samples token t. The loop stops when every row
   has produced its EOS or after `max_new_tokens`. The layers only read the cache; one update
   after the layer loop writes the step's slot of every layer, in place in the loop's carry
   (models/kv_cache.py). `SamplingConfig.cache_dtype` stores it in bfloat16 or int8.
   With `SamplingConfig.decode_phases` > 1 (on CPU for large caches) the loop is split into
   several loops over a cache that grows between them, each just long enough for its steps.
   On CPU (`SamplingConfig.unroll_decode_layers`) the decode steps instead run the LLM with
   unrolled layers on per-layer weights and per-layer, heads-major cache buffers, each written
   in place before its layer attends over it (`kv_cache.to_layers`); the prefill is unchanged.

Log-probs are `log_softmax(logits / temperature)` of the chosen token over the full vocabulary:
what PPO recomputes from a full forward over the sampled sequence. top-k / top-p only restrict
which token is drawn, they do not renormalise the returned log-prob. Greedy decoding
(temperature 0) returns `log_softmax(logits)` (the temperature-1 convention).

The model side is a small adapter (`TextDecoder`, and later the video LLM's), so the loop does
not care whether the prompt embeddings hold video tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlaif_jax.models import kv_cache
from rlaif_jax.models.kv_cache import CACHE_DTYPES
from rlaif_jax.models.llama import (Llama, LlamaConfig, LlamaOutput, init_cache,
                                   positions_from_mask, unstack_layers)
from rlaif_jax.parallel import sharding as su


# ---------------------------------------------------------------------------------------------
# Settings and result


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Hashable: it is a static argument of the jitted decode."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    num_samples: int = 1  # samples per prompt, adjacent rows
    eos_token_id: Optional[int] = 2  # None: never stop before max_new_tokens
    pad_token_id: int = 0
    prompt_bucket: int = 64  # prompts are left-padded to a multiple of this (fewer recompiles)
    # The KV cache's dtype: '' = the model's compute dtype; 'bfloat16' halves a float32 cache's
    # bytes, 'int8' (per-slot, per-head scales) quarters them. Decode reads the whole cache every
    # step, so its bytes bound the step time once the weights are read.
    cache_dtype: str = ""
    # Decode steps with the LLM's layers unrolled, each on its own weights (sliced out of the
    # scanned stack once a call) and its own heads-major cache buffers (kv_cache.to_layers).
    # None: on CPU only. In the scanned loop XLA:CPU copies each layer's weights and cache
    # slice out of the stacked buffers every step and runs the decode attention in several
    # elementwise passes; the TPU compiler reads them in place, and a scan compiles faster.
    unroll_decode_layers: Optional[bool] = None
    # The decode loop as this many loops, each attending over a cache just long enough for its
    # own steps (the cache grows by one padded copy between them), so early steps do not read
    # slots that later steps will write. Each loop is compiled on its own. None: on CPU, 4 when
    # the whole decode cache holds at least AUTO_PHASES_CACHE_BYTES (there a step reads the
    # cache at the memory's speed: batch 64 of docs/benchmarks.md's LLaMA, 535 MB, 4.9% faster
    # for 1.5 s more compile; batch 8, 67 MB, 3% for 1.9 s), else 1; 1 off CPU, where the
    # decode plans of benchmarks/decode_step.py assume one buffer.
    decode_phases: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 is off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 is off)")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")
        if self.prompt_bucket < 1:
            raise ValueError(f"prompt_bucket={self.prompt_bucket}: must be >= 1")
        if self.decode_phases is not None and self.decode_phases < 1:
            raise ValueError(f"decode_phases={self.decode_phases}: must be >= 1 (or None)")
        if self.cache_dtype and self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r}: expected '' (the compute dtype) "
                             f"or one of {sorted(CACHE_DTYPES)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class Generation:
    """Sampled continuations, right-padded to max_new_tokens; row i * n + j = sample j of prompt i."""

    tokens: jax.Array  # [B*n, T] int32, pad_token_id after the end
    logprobs: jax.Array  # [B*n, T] float32, log_softmax(logits / temperature)[token], 0 at pads
    mask: jax.Array  # [B*n, T] int32, 1 on generated tokens up to and including EOS
    lengths: jax.Array  # [B*n] int32, number of generated tokens (EOS included)
    has_eos: jax.Array  # [B*n] bool, whether the row ended with EOS


# ---------------------------------------------------------------------------------------------
# Decoder adapters: how a model turns a prompt batch into prefill embeddings, and runs its LLM.


@dataclasses.dataclass(frozen=True)
class TextDecoder:
    """A plain LLaMA: prefill embeddings are the token embeddings, the mask is the prompt mask."""

    model: Llama

    @property
    def llm_config(self) -> LlamaConfig:
        return self.model.config

    @property
    def has_vision(self) -> bool:
        return False

    def prefill_inputs(self, variables, input_ids, attention_mask, video_tokens=None,
                       has_video=None):
        del video_tokens, has_video  # a text model has no vision
        embeds = self.model.apply(variables, input_ids, method=Llama.embed)
        return embeds, attention_mask

    def run_llm(self, variables, **kwargs) -> LlamaOutput:
        return self.model.apply(variables, **kwargs)

    def logits(self, variables, hidden):
        return self.model.apply(variables, hidden, method=Llama.logits)

    def unrolled_llm(self, variables):
        """(decoder, variables) that run the same LLM with unrolled layers, each on its own
        weights (the decode loop's view; see SamplingConfig.unroll_decode_layers)."""
        config, variables = _unrolled_llm(self.model.config, variables)
        return dataclasses.replace(self, model=self.model.clone(config=config)), variables

    def full_logits(self, variables, input_ids, attention_mask, video_tokens=None,
                    has_video=None):
        """Teacher-forced logits [B, L, V] over a whole sequence (no cache)."""
        del video_tokens, has_video
        return self.model.apply(variables, input_ids, attention_mask=attention_mask).logits


@dataclasses.dataclass(frozen=True)
class VideoDecoder:
    """The video LLM (issue 3's fixed interface): `prepare_inputs` splices the video tokens in
    place of the `<image>` placeholder, giving [B, L+N-1] prefill embeddings and their mask; the
    decode steps run its `llm` submodule on plain token ids."""

    model: Any

    @property
    def llm_config(self) -> LlamaConfig:
        return self.model.config.llm

    @property
    def has_vision(self) -> bool:
        return True

    def encode_video(self, variables, frames):
        return _encode_video_jit(self, variables, jnp.asarray(frames))

    def prefill_inputs(self, variables, input_ids, attention_mask, video_tokens=None,
                       has_video=None):
        embeds, mask, _ = self.model.apply(variables, input_ids, attention_mask, video_tokens,
                                           has_video, method="prepare_inputs")
        return embeds, mask

    def run_llm(self, variables, **kwargs) -> LlamaOutput:
        return self.model.apply(variables, method=lambda module, **kw: module.llm(**kw), **kwargs)

    def logits(self, variables, hidden):
        return self.model.apply(variables, hidden,
                                method=lambda module, h: module.llm.logits(h))

    def unrolled_llm(self, variables):
        """(decoder, variables) whose LLM has unrolled layers (the decode loop's view)."""
        llm, unstacked = _unrolled_llm(
            self.model.config.llm,
            {name: tree["llm"] for name, tree in variables.items() if "llm" in tree})
        variables = {name: dict(tree, llm=unstacked[name]) if name in unstacked else tree
                     for name, tree in variables.items()}
        model = self.model.clone(config=self.model.config.replace(llm=llm))
        return dataclasses.replace(self, model=model), variables

    def full_logits(self, variables, input_ids, attention_mask, video_tokens=None,
                    has_video=None):
        """Teacher-forced logits aligned with input_ids (the video LLM's own forward)."""
        return self.model.apply(variables, input_ids, attention_mask, has_video=has_video,
                                video_tokens=video_tokens).logits


def _unrolled_llm(config: LlamaConfig, variables: dict):
    """(the LLaMA config with unrolled layers, its variables) from a config and variables."""
    # No remat either: a decode step takes no gradient, and its layer index stays a number.
    unrolled = config.replace(scan_layers=False, remat_policy="none")
    if config.scan_layers:
        variables = {name: unstack_layers(tree, config.num_layers)
                     for name, tree in variables.items()}
    return unrolled, variables


def _encode_video(decoder, variables, frames):
    return decoder.model.apply(variables, frames, method="encode_video")


_encode_video_jit = jax.jit(_encode_video, static_argnames=("decoder",))


def decoder_for(model: Any):
    """The adapter for a model (an adapter is passed through unchanged)."""
    if isinstance(model, Llama):
        return TextDecoder(model)
    if hasattr(model, "prefill_inputs") and hasattr(model, "run_llm"):
        return model
    if isinstance(model, nn.Module) and all(
            hasattr(model, name) for name in ("prepare_inputs", "encode_video")):
        return VideoDecoder(model)
    raise TypeError(f"generation does not know how to decode with {type(model).__name__}")


# ---------------------------------------------------------------------------------------------
# Token selection


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of each row (ties with the k-th kept too), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus: keeps the smallest set of top tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p  # the first token is always kept (mass before it is 0)
    num_kept = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` (the first maximum; the first NaN where a row has one) as two
    plain reductions: XLA:CPU runs argmax's (value, index) reduce 4-5x slower than a max and a
    min (0.6 against 0.17 ms on [8, 32000], 4.5 against 1.0 ms on [64, 32000])."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def select_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingConfig):
    """(tokens [R] int32, log-probs [R] float32) from logits [R, V]."""
    scaled = logits.astype(jnp.float32)
    if sampling.greedy:
        tokens = first_argmax(scaled)
    else:
        scaled = scaled / sampling.temperature
        candidates = top_p_filter(top_k_filter(scaled, sampling.top_k), sampling.top_p)
        # jax.random.categorical's Gumbel-max draw (the same noise, so the same tokens) with
        # first_argmax in place of its argmax.
        tokens = first_argmax(candidates + jax.random.gumbel(key, candidates.shape,
                                                             candidates.dtype))
    # The chosen token's log_softmax alone: no [R, V] array of log-probs is written.
    picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), picked - jax.nn.logsumexp(scaled, axis=-1)


# ---------------------------------------------------------------------------------------------
# Prompt bucketing


def bucket_length(length: int, bucket: int) -> int:
    return max(bucket, -(-length // bucket) * bucket)


def left_pad_to(input_ids, attention_mask, length: int, pad_token_id: int):
    """Adds padding columns on the left so prompts have `length` slots (positions unchanged)."""
    extra = length - input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"prompts of {input_ids.shape[1]} slots do not fit in {length}")
    if extra == 0:
        return input_ids, attention_mask
    xp = np if isinstance(input_ids, np.ndarray) else jnp
    input_ids = xp.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_token_id)
    attention_mask = xp.pad(attention_mask, ((0, 0), (extra, 0)), constant_values=0)
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# The jitted prefill + decode


def _repeat_rows(x: jax.Array, n: int, axis: int = 0) -> jax.Array:
    return x if n == 1 else jnp.repeat(x, n, axis=axis)


# A per-layer, heads-major buffer's axes (kv_cache.to_layers): [batch, kv_heads, slots, head_dim].
LAYER_CACHE_AXES = ("act_batch", "act_heads", "act_length", None)


def _constrain_cache(cache: dict, mesh, rules) -> dict:
    """Each cache buffer sharded as CACHE_AXES, or LAYER_CACHE_AXES for a per-layer cache (an
    int8 cache's scales lack head_dim)."""
    def constrain(buffer, axes):
        return su.constrain(buffer, axes[:buffer.ndim], mesh, rules)

    if kv_cache.is_per_layer(cache):
        return {name: tuple(constrain(b, LAYER_CACHE_AXES) for b in buffers)
                for name, buffers in cache.items()}
    return {name: constrain(buffer, su.CACHE_AXES) for name, buffer in cache.items()}


AUTO_PHASES_CACHE_BYTES = 256 * 2 ** 20


def auto_decode_phases(cache: dict, slots: int, platform: str) -> int:
    """SamplingConfig.decode_phases=None: how many decode loops, from the cache's bytes once
    grown to `slots` (its buffers hold slots on axis 2)."""
    if platform != "cpu":
        return 1
    total = sum(leaf.size // leaf.shape[2] * slots * leaf.dtype.itemsize
                for leaf in jax.tree.leaves(cache))
    return 4 if total >= AUTO_PHASES_CACHE_BYTES else 1


def decode_phase_ends(new: int, phases: int) -> list[int]:
    """The step each decode loop stops before: steps 1 .. new - 1 (step 0's token comes from
    the prefill) split into `phases` runs of near-equal length, the last ending at `new`."""
    steps = new - 1
    ends = [1 + -(-steps * (k + 1) // phases) for k in range(phases)]
    return sorted(set(ends))


def grow_cache(cache: dict, slots: int) -> dict:
    """The cache with its slots (axis 2 of a stacked or a per-layer buffer) padded to `slots`:
    zeros, masked out until a step writes them."""
    def grow(buffer):
        extra = slots - buffer.shape[2]
        if extra == 0:
            return buffer
        return jnp.pad(buffer, ((0, 0), (0, 0), (0, extra)) + ((0, 0),) * (buffer.ndim - 3))

    return jax.tree.map(grow, cache)


def _generate_core(decoder, variables, input_ids, attention_mask, video_tokens, has_video, rng,
                   sampling: SamplingConfig, mesh, rules) -> Generation:
    cfg = decoder.llm_config
    n, new = sampling.num_samples, sampling.max_new_tokens
    pad, eos = sampling.pad_token_id, sampling.eos_token_id

    # Prefill the B prompts once, into a cache of exactly the prompt's slots.
    embeds, prompt_mask = decoder.prefill_inputs(variables, input_ids, attention_mask,
                                                 video_tokens, has_video)
    prompt_mask = prompt_mask.astype(jnp.int32)
    batch, prompt_slots = prompt_mask.shape
    prefill_cache = _constrain_cache(
        init_cache(cfg, batch, prompt_slots, sampling.cache_dtype or None), mesh, rules)
    out = decoder.run_llm(
        variables, inputs_embeds=embeds, attention_mask=prompt_mask,
        position_ids=positions_from_mask(prompt_mask), cache=prefill_cache,
        cache_index=jnp.zeros((), jnp.int32), compute_logits=False)
    # Left padding puts every row's last real token in the last slot.
    first_logits = decoder.logits(variables, out.last_hidden_state[:, -1:])[:, 0]

    # n samples per prompt: repeat the prompt's cache, never recompute it. The decode cache has
    # one slot per generated token except the last (which is sampled, never fed back); it is
    # allocated for the first decode loop's steps and grown before each later one.
    rows = batch * n
    platform = (mesh.devices.flat[0].platform if mesh is not None  # a TPU topology compiled
                else jax.default_backend())                        # from a CPU is TPU
    cache = jax.tree.map(lambda prefilled: _repeat_rows(prefilled, n, axis=1), out.cache)
    phase_ends = decode_phase_ends(new, sampling.decode_phases or auto_decode_phases(
        cache, prompt_slots + new - 1, platform))
    # The decode steps' view of the LLM and its cache (the prefill above keeps the scanned
    # layers and the stacked cache): see SamplingConfig.unroll_decode_layers.
    unroll = sampling.unroll_decode_layers
    if unroll is None:
        unroll = platform == "cpu"
    step_decoder, step_variables = decoder, variables
    if unroll and hasattr(decoder, "unrolled_llm"):  # decoders without one keep the scan
        step_decoder, step_variables = decoder.unrolled_llm(variables)
        cache = kv_cache.to_layers(cache)
    cache = _constrain_cache(cache, mesh, rules)
    first_logits = _repeat_rows(first_logits, n)
    prompt_mask = _repeat_rows(prompt_mask, n)
    prompt_lengths = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    # Generated slots are real; causality (query slot >= key slot) hides the ones not yet written.
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((rows, new - 1), jnp.int32)], axis=1)

    def record(state, step, tokens, logprobs):
        out_tokens, out_logprobs, out_mask, done = state
        live = ~done
        out_tokens = jax.lax.dynamic_update_slice(
            out_tokens, jnp.where(live, tokens, pad)[:, None], (0, step))
        out_logprobs = jax.lax.dynamic_update_slice(
            out_logprobs, jnp.where(live, logprobs, 0.0)[:, None], (0, step))
        out_mask = jax.lax.dynamic_update_slice(
            out_mask, live.astype(jnp.int32)[:, None], (0, step))
        if eos is not None:
            done = done | (tokens == eos)
        return out_tokens, out_logprobs, out_mask, done

    state = (jnp.full((rows, new), pad, jnp.int32), jnp.zeros((rows, new), jnp.float32),
             jnp.zeros((rows, new), jnp.int32), jnp.zeros((rows,), bool))
    rng, key = jax.random.split(rng)
    tokens, logprobs = select_tokens(first_logits, key, sampling)
    state = record(state, 0, tokens, logprobs)

    def decode_loop(carry, end: int):
        """Decode steps up to `end` (exclusive) over a cache of their slots."""
        slots = prompt_slots + end - 1
        step_mask = su.constrain(cache_mask[:, :slots], ("act_batch", None), mesh, rules)

        def keep_going(carry):
            step, _, _, state, _ = carry
            return (step < end) & ~jnp.all(state[3])

        def decode_step(carry):
            step, previous, cache, state, rng = carry
            slot = prompt_slots + step - 1
            out = step_decoder.run_llm(
                step_variables, input_ids=previous[:, None], attention_mask=step_mask,
                position_ids=(prompt_lengths + step - 1)[:, None], cache=cache,
                cache_index=slot)
            cache = _constrain_cache(out.cache, mesh, rules)
            rng, key = jax.random.split(rng)
            tokens, logprobs = select_tokens(out.logits[:, 0], key, sampling)
            return step + 1, tokens, cache, record(state, step, tokens, logprobs), rng

        step, previous, cache, state, rng = carry
        cache = _constrain_cache(grow_cache(cache, slots), mesh, rules)
        return jax.lax.while_loop(keep_going, decode_step, (step, previous, cache, state, rng))

    carry = (jnp.ones((), jnp.int32), tokens, cache, state, rng)
    for end in phase_ends:
        carry = decode_loop(carry, end)
    out_tokens, out_logprobs, out_mask, done = carry[3]
    return Generation(tokens=out_tokens, logprobs=out_logprobs, mask=out_mask,
                      lengths=jnp.sum(out_mask, axis=-1).astype(jnp.int32), has_eos=done)


_generate_jit = jax.jit(_generate_core, static_argnames=("decoder", "sampling", "mesh", "rules"))


def generate(model, variables: dict, batch: dict, rng: jax.Array, sampling: SamplingConfig,
             *, video_tokens: Optional[jax.Array] = None, mesh=None,
             rules=su.DEFAULT_RULES) -> Generation:
    """Samples `sampling.num_samples` continuations of each left-padded prompt in `batch`.

    model: a `Llama` (or a decoder adapter); variables: {'params': ...[, 'lora': adapter]}.
    batch: `input_ids` / `attention_mask` [B, L] left-padded (the batch of docs/method.md), and for a video
    model `has_video` [B] with either `frames` or precomputed `video_tokens` (so the n samples and
    PPO's later passes reuse one encoding). With a `mesh`, params must already be placed on it
    (`parallel.sharding.shard_params`); B must be a multiple of the batch axes' size.
    """
    decoder = decoder_for(model)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} "
                         "must both be [batch, length]")
    has_video = batch.get("has_video")
    if video_tokens is None:
        video_tokens = batch.get("video_tokens")
    if decoder.has_vision and video_tokens is None and batch.get("frames") is not None:
        video_tokens = decoder.encode_video(variables, batch["frames"])
    if not decoder.has_vision and has_video is not None and np.any(np.asarray(has_video)):
        raise ValueError("the batch has videos but the model has no vision encoder")
    input_ids, attention_mask = left_pad_to(
        input_ids, attention_mask, bucket_length(input_ids.shape[1], sampling.prompt_bucket),
        sampling.pad_token_id)
    arrays = [jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
              None if video_tokens is None else jnp.asarray(video_tokens),
              None if has_video is None else jnp.asarray(has_video, bool)]
    if mesh is not None:
        divisor = su.batch_divisor(mesh)
        if input_ids.shape[0] % divisor:
            raise ValueError(f"batch of {input_ids.shape[0]} prompts is not a multiple of the "
                             f"{divisor} batch shards of the mesh")
        arrays = [None if a is None else jax.device_put(a, su.batch_sharding(mesh, a.ndim))
                  for a in arrays]
    with su.mesh_context(mesh, rules):
        return _generate_jit(decoder, variables, *arrays, rng, sampling=sampling,
                             mesh=mesh, rules=tuple(rules) if mesh is not None else None)


def sequence_logprobs(model, variables: dict, batch: dict, generation: Generation,
                      num_samples: int, temperature: float, *,
                      video_tokens: Optional[jax.Array] = None) -> jax.Array:
    """Log-probs of the generated tokens recomputed by one full forward over prompt + response.

    What PPO relies on (and how it recomputes them, without the cache). `batch` holds the
    prompts as given to `generate` (`input_ids`, `attention_mask`, and `has_video` with
    `video_tokens` for a video model). Returns [B*n, T] float32
    `log_softmax(logits / temperature)` of each generated token (temperature 0 read as 1),
    zero where the generation's mask is 0.
    """
    decoder = decoder_for(model)
    if video_tokens is None:
        video_tokens = batch.get("video_tokens")
    prompt_ids = _repeat_rows(jnp.asarray(batch["input_ids"], jnp.int32), num_samples)
    prompt_mask = _repeat_rows(jnp.asarray(batch["attention_mask"], jnp.int32), num_samples)
    has_video = batch.get("has_video")
    if has_video is not None:
        has_video = _repeat_rows(jnp.asarray(has_video, bool), num_samples)
    if video_tokens is not None:
        video_tokens = _repeat_rows(jnp.asarray(video_tokens), num_samples)
    ids = jnp.concatenate([prompt_ids, generation.tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, generation.mask], axis=1)
    logits = decoder.full_logits(variables, ids, mask, video_tokens, has_video)
    prompt_slots, new = prompt_ids.shape[1], generation.tokens.shape[1]
    # The logit at index s predicts the token at index s + 1.
    logits = logits[:, prompt_slots - 1: prompt_slots - 1 + new]
    logp = jax.nn.log_softmax(logits / (temperature or 1.0), axis=-1)
    chosen = jnp.take_along_axis(logp, generation.tokens[..., None], axis=-1)[..., 0]
    return jnp.where(generation.mask.astype(bool), chosen, 0.0)
