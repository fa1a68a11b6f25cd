"""KV-cache sampler: greedy parity with transformers' generate, log-probs that PPO can recompute,
samplers, early stop, bucketing, and the same outputs sharded over 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import rlaif_jax
from jax.sharding import PartitionSpec

from rlaif_jax.parallel import sharding as su
from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.sampling.generate import (AUTO_PHASES_CACHE_BYTES, SamplingConfig, TextDecoder,
                                        _generate_jit, auto_decode_phases, decode_phase_ends,
                                        first_argmax, generate, left_pad_to, select_tokens,
                                        sequence_logprobs, top_k_filter, top_p_filter)
from tests.support import left_padded_batch, save_tiny_hf_llama

VOCAB = 97
NEAR_TIE = 1e-4  # docs/method.md: tokens identical up to the first step whose top-2 margin is below


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("gqa"))
    hf_model = save_tiny_hf_llama(directory, seed=4, num_key_value_heads=2)
    model, params = rlaif_jax.from_pretrained(directory)
    return hf_model, model, {"params": params}


def _prompts(lengths, seed=0):
    ids, mask = left_padded_batch(VOCAB, lengths=lengths, total=max(lengths), seed=seed)
    return {"input_ids": ids, "attention_mask": mask}


def _hf_greedy(hf_model, batch, max_new, eos):
    out = hf_model.generate(
        torch.as_tensor(batch["input_ids"], dtype=torch.long),
        attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
        do_sample=False, max_new_tokens=max_new, pad_token_id=0, eos_token_id=eos,
        output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, batch["input_ids"].shape[1]:].numpy()
    logits = torch.stack(out.logits, 1).float().numpy()  # [B, steps, V]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    margins = top2[..., 1] - top2[..., 0]
    return tokens, margins


def test_greedy_matches_transformers_generate(tiny):
    hf_model, model, variables = tiny
    batch = _prompts([9, 5, 2, 7, 4], seed=1)
    max_new = 14
    # Pick an EOS that the greedy continuation of row 0 reaches mid-way, so early stopping and
    # the pads after EOS are exercised against transformers' own handling.
    free_run, _ = _hf_greedy(hf_model, batch, max_new, eos=None)
    eos = int(free_run[0, 4])
    ref, margins = _hf_greedy(hf_model, batch, max_new, eos=eos)
    ours = generate(model, variables, batch, jax.random.PRNGKey(0),
                    SamplingConfig(max_new_tokens=max_new, temperature=0.0, eos_token_id=eos,
                                   prompt_bucket=16))
    tokens = np.asarray(ours.tokens)
    ref = np.pad(ref, ((0, 0), (0, max_new - ref.shape[1])))  # transformers stops when all end
    compared = 0
    for row in range(ref.shape[0]):
        ties = np.nonzero(margins[row] < NEAR_TIE)[0]
        upto = ties[0] + 1 if ties.size else max_new  # the tie step itself may differ
        upto = min(upto, margins.shape[1])
        np.testing.assert_array_equal(tokens[row, :upto], ref[row, :upto], err_msg=f"row {row}")
        compared += upto
    assert compared >= 0.8 * ref.shape[0] * margins.shape[1], "near ties hid most of the test"
    first_eos = int(np.argmax(free_run[0] == eos))
    assert int(ours.lengths[0]) == first_eos + 1 and tokens[0, first_eos] == eos
    assert bool(ours.has_eos[0]) and first_eos + 1 < max_new
    assert np.all(tokens[0, int(ours.lengths[0]):] == 0)
    expected_mask = (np.arange(max_new)[None] < np.asarray(ours.lengths)[:, None]).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(ours.mask), expected_mask)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 12, 0.9)])
def test_sampled_logprobs_equal_full_forward(tiny, temperature, top_k, top_p):
    _, model, variables = tiny
    batch = _prompts([6, 3, 8], seed=2)
    sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, top_k=top_k,
                              top_p=top_p, num_samples=3, eos_token_id=7, prompt_bucket=8)
    gen = generate(model, variables, batch, jax.random.PRNGKey(3), sampling)
    assert gen.tokens.shape == (9, 10) and gen.logprobs.dtype == jnp.float32
    recomputed = sequence_logprobs(model, variables, batch, gen, 3, temperature)
    mask = np.asarray(gen.mask).astype(bool)
    np.testing.assert_allclose(np.asarray(gen.logprobs)[mask], np.asarray(recomputed)[mask],
                               rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(gen.logprobs)[~mask] == 0)
    assert np.all(np.asarray(gen.logprobs)[mask] < 0)
    # Mask semantics: 1 up to and including EOS, pads after; has_eos iff the last token is EOS.
    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    for row in range(tokens.shape[0]):
        n = lengths[row]
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert np.all(tokens[row, n:] == 0)
        assert bool(gen.has_eos[row]) == (n > 0 and tokens[row, n - 1] == 7)
        assert 7 not in tokens[row, :n - 1]
    if top_k:
        # Every drawn token is among the top-k of the (recomputed) distribution at its step.
        ids = jnp.concatenate([jnp.repeat(jnp.asarray(batch["input_ids"]), 3, 0), gen.tokens], 1)
        full_mask = jnp.concatenate(
            [jnp.repeat(jnp.asarray(batch["attention_mask"]), 3, 0), gen.mask], 1)
        logits = model.apply(variables, ids, attention_mask=full_mask).logits
        logits = np.asarray(logits[:, 7:7 + 10])
        rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)
        assert np.all(rank[mask] < top_k)


def test_samples_are_distinct_and_rng_is_explicit(tiny):
    _, model, variables = tiny
    batch = _prompts([5, 5], seed=3)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4,
                              eos_token_id=None, prompt_bucket=8)
    a = generate(model, variables, batch, jax.random.PRNGKey(0), sampling)
    b = generate(model, variables, batch, jax.random.PRNGKey(0), sampling)
    c = generate(model, variables, batch, jax.random.PRNGKey(1), sampling)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    rows = {tuple(r) for r in np.asarray(a.tokens)}
    assert len(rows) == 8  # n samples of one prompt differ from one another
    assert np.all(np.asarray(a.lengths) == 8) and not np.any(a.has_eos)


def test_samples_of_a_prompt_share_its_prefill(tiny):
    """Row i*n + j continues prompt i: greedy samples of one prompt are identical."""
    _, model, variables = tiny
    batch = _prompts([6, 2, 4], seed=4)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, eos_token_id=None, prompt_bucket=8)
    one = generate(model, variables, batch, jax.random.PRNGKey(0), greedy)
    three = generate(model, variables, batch, jax.random.PRNGKey(0), greedy.replace(num_samples=3))
    np.testing.assert_array_equal(np.repeat(np.asarray(one.tokens), 3, 0), three.tokens)
    np.testing.assert_allclose(np.repeat(np.asarray(one.logprobs), 3, 0), three.logprobs,
                               rtol=1e-6, atol=1e-6)


def test_filters_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    kept_k = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), 5)))
    np.testing.assert_array_equal(kept_k, logits >= np.sort(logits, -1)[:, -5:-4])
    assert np.all(kept_k.sum(-1) == 5)
    kept_p = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), 0.6)))
    for row in range(4):
        order = np.argsort(-logits[row])
        probs = np.exp(logits[row] - logits[row].max())
        probs /= probs.sum()
        need = int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)  # smallest set reaching p
        assert set(np.nonzero(kept_p[row])[0]) == set(order[:need])
    # A tiny p keeps only the argmax: sampling then equals greedy.
    tokens, _ = select_tokens(jnp.asarray(logits), jax.random.PRNGKey(0),
                              SamplingConfig(temperature=1.0, top_p=1e-6))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_first_argmax_is_numpys_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    logits[1, [3, 7, 40]] = 9.0  # a tie: the first maximum wins
    logits[2, :] = -np.inf  # no finite logit: index 0, as numpy says
    logits[3, [5, 9]] = np.nan  # a NaN: the first NaN, as numpy says
    logits[4, 49] = np.inf
    logits[5] = np.round(logits[5])  # many ties
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(logits))),
                                  logits.argmax(-1))


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampled_tokens_are_jax_categoricals(top_k):
    """The sampler's Gumbel-max draw picks what jax.random.categorical picks with the same key."""
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(64, 300)), jnp.float32)
    sampling = SamplingConfig(temperature=0.8, top_k=top_k)
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        tokens, _ = select_tokens(logits, key, sampling)
        expected = jax.random.categorical(key, top_k_filter(logits / 0.8, top_k), axis=-1)
        np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_selected_logprobs_are_log_softmax_of_the_token(temperature):
    logits = np.random.default_rng(2).normal(size=(5, 40)).astype(np.float32) * 4
    sampling = SamplingConfig(temperature=temperature)
    tokens, logprobs = select_tokens(jnp.asarray(logits), jax.random.PRNGKey(3), sampling)
    if temperature == 0.0:
        np.testing.assert_array_equal(tokens, logits.argmax(-1))
    scaled = torch.log_softmax(torch.as_tensor(logits) / (temperature or 1.0), -1).numpy()
    np.testing.assert_allclose(logprobs, scaled[np.arange(5), np.asarray(tokens)], atol=1e-5)


class CountingDecoder(TextDecoder):
    """Counts LLM calls at run time (prefill + one per executed decode step)."""

    calls = []

    def run_llm(self, variables, **kwargs):
        jax.debug.callback(lambda: CountingDecoder.calls.append(1))
        return super().run_llm(variables, **kwargs)


def test_decoding_stops_when_every_row_has_eos(tiny):
    _, model, variables = tiny
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0, eos_token_id=None, prompt_bucket=8)
    # Find prompts whose greedy runs share a token early: as EOS, the loop must then end at the
    # later of the two rows' first EOS, not at max_new_tokens.
    for seed in range(5, 30):
        batch = _prompts([5, 3], seed=seed)
        free = np.asarray(generate(model, variables, batch, jax.random.PRNGKey(0), greedy).tokens)
        common = set(free[0, :8]) & set(free[1, :8])
        if common:
            break
    eos = min(common, key=lambda t: max(np.argmax(free[r] == t) for r in range(2)))
    ends = [int(np.argmax(free[r] == eos)) + 1 for r in range(2)]
    CountingDecoder.calls.clear()
    gen = generate(CountingDecoder(model), variables, batch, jax.random.PRNGKey(0),
                   greedy.replace(eos_token_id=int(eos)))
    jax.effects_barrier()
    np.testing.assert_array_equal(gen.lengths, ends)
    assert len(CountingDecoder.calls) == 1 + (max(ends) - 1)  # prefill + decode steps run


def test_bucketing_pads_left_without_changing_outputs(tiny):
    _, model, variables = tiny
    batch = _prompts([7, 4], seed=6)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.9, eos_token_id=None,
                              prompt_bucket=1)
    exact = generate(model, variables, batch, jax.random.PRNGKey(2), sampling)
    bucketed = generate(model, variables, batch, jax.random.PRNGKey(2),
                        sampling.replace(prompt_bucket=32))
    np.testing.assert_array_equal(exact.tokens, bucketed.tokens)
    np.testing.assert_allclose(exact.logprobs, bucketed.logprobs, rtol=1e-5, atol=1e-5)
    # Two prompt lengths in one bucket share one compiled program.
    before = _generate_jit._cache_size()
    shorter = {k: v[:, 2:] for k, v in batch.items()}
    generate(model, variables, shorter, jax.random.PRNGKey(2), sampling.replace(prompt_bucket=32))
    assert _generate_jit._cache_size() == before
    ids, mask = left_pad_to(batch["input_ids"], batch["attention_mask"], 32, 0)
    assert ids.shape == (2, 32) and mask[:, :25].sum() == 0


@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_phases_change_no_output(tiny, unroll, temperature):
    """Loops over a growing cache give the tokens and log-probs of one loop over the whole
    cache: the slots a phase leaves out are the ones its steps mask out anyway."""
    _, model, variables = tiny
    batch = _prompts([7, 4, 6], seed=8)
    sampling = SamplingConfig(max_new_tokens=7, temperature=temperature, eos_token_id=None,
                              prompt_bucket=8, num_samples=2, unroll_decode_layers=unroll,
                              decode_phases=1)
    one = generate(model, variables, batch, jax.random.PRNGKey(5), sampling)
    for phases in (3, 9):  # more phases than steps: one loop a step
        split = generate(model, variables, batch, jax.random.PRNGKey(5),
                         sampling.replace(decode_phases=phases))
        np.testing.assert_array_equal(one.tokens, split.tokens)
        np.testing.assert_allclose(one.logprobs, split.logprobs, rtol=1e-5, atol=1e-5)
    # With an EOS the rows stop at different steps, some in a phase after the first.
    eos = int(one.tokens[0, 1])
    stop = sampling.replace(eos_token_id=eos)
    np.testing.assert_array_equal(
        generate(model, variables, batch, jax.random.PRNGKey(5), stop).tokens,
        generate(model, variables, batch, jax.random.PRNGKey(5),
                 stop.replace(decode_phases=3)).tokens)


def test_decode_phase_ends_and_the_automatic_count():
    assert decode_phase_ends(128, 4) == [33, 65, 97, 128]
    assert decode_phase_ends(128, 1) == [128]
    assert decode_phase_ends(3, 4) == [2, 3]  # two decode steps: at most two loops
    assert decode_phase_ends(1, 4) == [1]  # no decode step
    layer = jnp.zeros((2, 8, 4, 1, 16))  # [layers, rows, slots, kv_heads, head_dim] float32
    per_slot = 2 * layer.size // 4 * 4  # k and v bytes a slot
    slots_at_threshold = -(-AUTO_PHASES_CACHE_BYTES // per_slot)
    cache = {"k": layer, "v": layer}
    assert auto_decode_phases(cache, slots_at_threshold, "cpu") == 4
    assert auto_decode_phases(cache, slots_at_threshold - 1, "cpu") == 1
    assert auto_decode_phases(cache, slots_at_threshold, "tpu") == 1
    with pytest.raises(ValueError, match="decode_phases"):
        SamplingConfig(decode_phases=0)


def test_sharded_on_eight_devices_matches_one_device(tiny):
    _, model, variables = tiny
    assert jax.device_count() == 8
    mesh = make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
    rules = su.DEFAULT_RULES
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    sharded = {"params": su.shard_params(variables["params"], boxed["params"], mesh, rules)}
    q_kernel = sharded["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    batch = _prompts([9, 3, 6, 5], seed=7)
    for sampling in (SamplingConfig(max_new_tokens=8, temperature=0.0, eos_token_id=None,
                                    prompt_bucket=16),
                     SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=30, num_samples=2,
                                    eos_token_id=11, prompt_bucket=16, decode_phases=2)):
        single = generate(model, variables, batch, jax.random.PRNGKey(5), sampling)
        multi = generate(model, sharded, batch, jax.random.PRNGKey(5), sampling, mesh=mesh,
                         rules=rules)
        assert len(multi.tokens.sharding.device_set) == 8
        np.testing.assert_array_equal(single.tokens, multi.tokens)
        np.testing.assert_array_equal(single.mask, multi.mask)
        np.testing.assert_allclose(single.logprobs, multi.logprobs, rtol=1e-5, atol=1e-5)
    # The KV cache [layers, rows, slots, kv_heads, head_dim] is constrained to rows over the
    # batch axes and heads over 'tensor' inside the program (not left to propagation).
    ids, mask = left_pad_to(batch["input_ids"], batch["attention_mask"], 16, 0)
    with su.mesh_context(mesh, rules):
        program = _generate_jit.lower(TextDecoder(model), sharded, ids, mask, None, None,
                                      jax.random.PRNGKey(0), sampling=sampling, mesh=mesh,
                                      rules=rules).as_text()
    assert '[{}, {"data", "fsdp"}, {}, {"tensor"}, {}]' in program
    with pytest.raises(ValueError, match="multiple of the 4 batch shards"):
        generate(model, sharded, _prompts([3, 2]), jax.random.PRNGKey(0), sampling, mesh=mesh)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(TypeError, match="decode"):
        generate(object(), {}, _prompts([2]), jax.random.PRNGKey(0), SamplingConfig())
