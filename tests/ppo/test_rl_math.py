"""PPO arithmetic against an independent NumPy implementation of docs/method.md's formulas.

The NumPy side is written with explicit per-row, per-column loops (the way the reference trainer
reads), on random inputs with gapped masks (holes inside responses, not only right padding), in
both pad modes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.ppo import rl_math as ppo_math

EOS, PAD, QMARK = 2, 0, 7
B, T = 6, 11


# ---------------------------------------------------------------------------------------------
# NumPy reference


def np_truncate(tokens, mask, extra=()):
    tokens, out_mask = tokens.copy(), np.zeros_like(mask)
    has_eos = np.zeros(len(tokens), bool)
    for i in range(len(tokens)):
        done = False
        for j in range(tokens.shape[1]):
            if done or not mask[i, j]:
                tokens[i, j] = PAD
                continue
            out_mask[i, j] = 1
            if tokens[i, j] == EOS:
                has_eos[i] = True
            done = tokens[i, j] == EOS or tokens[i, j] in extra
    return tokens, out_mask, has_eos


def np_shape(score, logp, ref, mask, has_eos, *, kl_coef, estimator, max_length, reference):
    rewards = np.zeros(logp.shape)
    kl = np.zeros(logp.shape)
    seq = np.zeros(len(score))
    for i in range(len(score)):
        for t in range(logp.shape[1]):
            if estimator == "k1":
                k = max(logp[i, t] - ref[i, t], 0.0)
            else:
                r = np.exp(ref[i, t] - logp[i, t])
                k = r - 1 - np.log(r)
            if reference or mask[i, t]:
                kl[i, t] = k
                rewards[i, t] = -kl_coef * k
        length = mask[i].sum()
        seq[i] = score[i] + (0.0 if has_eos[i] else -8.0) - 10.0 * length / max_length
        last = logp.shape[1] - 1 if reference else max(np.nonzero(mask[i])[0].tolist() or [0])
        rewards[i, last] += seq[i]
    return rewards * 10.0, kl, seq


def np_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros(rewards.shape)
    for i in range(rewards.shape[0]):
        lastgaelam, nextvalue = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[i, t]:
                continue
            delta = rewards[i, t] + gamma * nextvalue - values[i, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[i, t] = lastgaelam
            nextvalue = values[i, t]
    returns = (adv + values) * mask
    return adv, returns


def np_whiten(x, mask):
    picked = x[mask.astype(bool)]
    mean, var = picked.mean(), picked.var()
    return np.where(mask.astype(bool), (x - mean) / np.sqrt(var + 1e-8), 0.0)


def np_losses(logp, old_logp, adv, values, old_values, returns, entropy, weights):
    n = weights.sum()
    ratio = np.exp(logp - old_logp)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
    pg = (np.maximum(pg1, pg2) * weights).sum() / n
    clipfrac = ((pg2 > pg1) * weights).sum() / n
    approx_kl = (0.5 * (logp - old_logp) ** 2 * weights).sum() / n
    vclip = np.minimum(np.maximum(values, old_values - 0.2), old_values + 0.2)
    vf1, vf2 = (values - returns) ** 2, (vclip - returns) ** 2
    vf = 0.5 * (np.maximum(vf1, vf2) * weights).sum() / n
    return {"pg_loss": pg, "pg_clipfrac": clipfrac, "approx_kl": approx_kl, "vf_loss": vf,
            "vf_clipfrac": ((vf2 > vf1) * weights).sum() / n,
            "value_error": (vf1 * weights).sum() / n,
            "entropy": (entropy * weights).sum() / n, "loss": pg + 0.1 * vf}


# ---------------------------------------------------------------------------------------------
# Inputs


def gapped_inputs(seed):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    for i in range(B):
        mask[i, rng.integers(3, T + 1):] = 0  # right padding
        holes = rng.random(T) < 0.25  # gaps inside the response
        holes[0] = False
        mask[i] &= ~holes
    mask[0] = 1  # one full row, one row with a single real token
    mask[1] = 0
    mask[1, 0] = 1
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    logp = -np.abs(f(B, T)) - 0.1
    return dict(mask=mask, score=f(B), logp=logp, ref=logp + 0.5 * f(B, T),
                values=f(B, T), has_eos=rng.random(B) < 0.6,
                new_logp=logp + 0.3 * f(B, T), new_values=f(B, T),
                entropy=np.abs(f(B, T)))


# ---------------------------------------------------------------------------------------------
# Tests


def test_truncation_at_first_eos_and_question_mark_quirk():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 12, size=(B, T)).astype(np.int32)
    tokens[0, 4] = EOS
    tokens[1, 2], tokens[1, 6] = EOS, EOS  # only the first counts
    tokens[2, 3] = QMARK
    tokens[2, 8] = EOS
    mask = np.ones((B, T), np.int32)
    mask[3, 5:] = 0  # a row the sampler already ended
    tokens[3, 5:] = PAD
    for extra in ((), (QMARK,)):
        got = jax.device_get(ppo_math.truncate_at_stop(jnp.asarray(tokens), jnp.asarray(mask),
                                                       EOS, PAD, extra))
        want = np_truncate(tokens, mask, extra)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), w)
    # The quirk cuts row 2 at "?", which drops its EOS (and so it draws the no-EOS penalty).
    _, quirk_mask, quirk_eos = ppo_math.truncate_at_stop(jnp.asarray(tokens), jnp.asarray(mask),
                                                         EOS, PAD, (QMARK,))
    assert int(quirk_mask[2].sum()) == 4 and not bool(quirk_eos[2])
    _, plain_mask, plain_eos = ppo_math.truncate_at_stop(jnp.asarray(tokens), jnp.asarray(mask),
                                                         EOS, PAD)
    assert int(plain_mask[2].sum()) == 9 and bool(plain_eos[2])
    assert int(plain_mask[1].sum()) == 3 and int(plain_mask[0].sum()) == 5


@pytest.mark.parametrize("reference_pads", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_shaping_gae_whitening_match_numpy(reference_pads, estimator):
    x = gapped_inputs(1)
    got = ppo_math.shape_rewards(
        jnp.asarray(x["score"]), jnp.asarray(x["logp"]), jnp.asarray(x["ref"]),
        jnp.asarray(x["mask"]), jnp.asarray(x["has_eos"]), kl_coef=0.1, kl_estimator=estimator,
        max_length=T, reference_pads=reference_pads)
    rewards, kl, seq = np_shape(x["score"], x["logp"], x["ref"], x["mask"], x["has_eos"],
                                kl_coef=0.1, estimator=estimator, max_length=T,
                                reference=reference_pads)
    np.testing.assert_allclose(got["rewards"], rewards, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["kl"], kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["sequence_reward"], seq, rtol=1e-6, atol=1e-6)
    if reference_pads:  # pads carry KL penalties and the last column carries the reward
        assert np.abs(np.asarray(got["rewards"])[x["mask"] == 0]).max() > 0
    else:
        assert np.all(np.asarray(got["rewards"])[x["mask"] == 0] == 0)

    steps = np.ones_like(x["mask"]) if reference_pads else x["mask"]
    for gamma, lam in ((1.0, 1.0), (0.9, 0.8)):
        adv, ret = np_gae(rewards, x["values"] * steps, steps, gamma, lam)
        got_adv, got_ret = ppo_math.masked_gae(jnp.asarray(rewards), jnp.asarray(x["values"] * steps),
                                               jnp.asarray(steps), gamma, lam)
        np.testing.assert_allclose(got_adv, adv, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got_ret, ret, rtol=1e-5, atol=1e-4)
        white, ret2 = ppo_math.advantages_and_returns(
            jnp.asarray(rewards), jnp.asarray(x["values"]), jnp.asarray(x["mask"]), gamma=gamma,
            lam=lam, reference_pads=reference_pads)
        np.testing.assert_allclose(white, np_whiten(adv, steps), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ret2, ret, rtol=1e-5, atol=1e-4)
        kept = np.asarray(white)[steps.astype(bool)]
        assert abs(kept.mean()) < 1e-5 and abs(kept.std() - 1) < 1e-4


def test_gae_skips_gaps_rather_than_treating_them_as_steps():
    # gamma = lambda = 1, reward only at the end: every real token's advantage is the reward
    # minus its own value, whatever holes lie between it and the end.
    mask = np.array([[1, 0, 0, 1, 1, 0]], np.int32)
    rewards = np.array([[0, 5, 5, 0, 3, 9]], np.float32) * mask
    values = np.array([[1, 7, 7, 2, 0.5, 4]], np.float32) * mask
    adv, _ = ppo_math.masked_gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_allclose(adv, [[2.0, 0, 0, 1.0, 2.5, 0]], atol=1e-6)


@pytest.mark.parametrize("reference_pads", [False, True])
def test_losses_match_numpy(reference_pads):
    x = gapped_inputs(2)
    rewards, _, _ = np_shape(x["score"], x["logp"], x["ref"], x["mask"], x["has_eos"],
                             kl_coef=0.1, estimator="k1", max_length=T, reference=reference_pads)
    steps = np.ones_like(x["mask"]) if reference_pads else x["mask"]
    adv, ret = np_gae(rewards, x["values"] * steps, steps, 1.0, 1.0)
    adv = np_whiten(adv, steps)
    batch = {"mask": jnp.asarray(x["mask"]), "old_logprobs": jnp.asarray(x["logp"]),
             "old_values": jnp.asarray(x["values"]), "advantages": jnp.asarray(adv, jnp.float32),
             "returns": jnp.asarray(ret, jnp.float32)}
    total, sums = ppo_math.ppo_loss_sums(jnp.asarray(x["new_logp"]), jnp.asarray(x["new_values"]),
                                         jnp.asarray(x["entropy"]), batch,
                                         reference_pads=reference_pads)
    want = np_losses(x["new_logp"], x["logp"], adv, x["new_values"], x["values"], ret,
                     x["entropy"], steps.astype(np.float64))
    weight = float(sums["weight"])
    assert weight == steps.sum()
    for key, value in want.items():
        np.testing.assert_allclose(float(sums[key]) / weight, value, rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    np.testing.assert_allclose(float(total) / weight, want["loss"], rtol=1e-5)
    assert 0 < want["pg_clipfrac"] < 1 and 0 < want["vf_clipfrac"] < 1  # both branches taken


def test_entropy_and_k3_properties():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5, 9)), jnp.float32)
    p = np.asarray(jax.nn.softmax(logits, -1))
    np.testing.assert_allclose(ppo_math.token_entropy(logits), -(p * np.log(p)).sum(-1),
                               rtol=1e-5)
    same = ppo_math.kl_penalty(jnp.ones(3), jnp.ones(3), "k3")
    assert np.allclose(same, 0)
    with pytest.raises(ValueError, match="k2"):
        ppo_math.kl_penalty(jnp.ones(3), jnp.ones(3), "k2")


def test_whitening_is_global_under_sharding():
    """Whitening a batch sharded over 8 devices uses the statistics of the whole batch."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(8), ("data",))
    rng = np.random.default_rng(4)
    # Each device's rows have a very different mean: per-shard whitening would differ a lot.
    x = (rng.normal(size=(16, 6)) + np.repeat(np.arange(8), 2)[:, None] * 3).astype(np.float32)
    mask = (rng.random((16, 6)) < 0.8).astype(np.int32)
    sharding = NamedSharding(mesh, P("data"))
    xs, ms = jax.device_put(x, sharding), jax.device_put(mask, sharding)
    got = jax.jit(ppo_math.whiten, out_shardings=sharding)(xs, ms)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, np_whiten(x, mask), rtol=1e-4, atol=1e-4)
