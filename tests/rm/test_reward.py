"""Reward model: the loss against NumPy, the score at the real last token, a sharded LoRA step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlaif_jax.data import prompts
from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.parallel.sharding import DEFAULT_RULES
from rlaif_jax.rm import data as rm_data
from rlaif_jax.rm import model as rm_model
from rlaif_jax.engine import state as state_lib
from rlaif_jax.engine.step import make_train_step
from tests.support import (IMAGE_ID, host_variables, init_fn, random_preference_batch, tiny_reward_model)

LR = 1.0  # plain SGD: the update is the gradient itself, without float32 round-off
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
EIGHT = {"data": 2, "fsdp": 2, "tensor": 2}


def numpy_loss(rewards, preference, valid):
    """The reference's loss, written independently: -log sigmoid(r_chosen - r_rejected),
    averaged over valid pairs, plus 1e-3 * |mean(r1 + r2)|."""
    r = rewards[valid].astype(np.float64)
    p = preference[valid]
    chosen = np.where(p == 1, r[:, 0], r[:, 1])
    rejected = np.where(p == 1, r[:, 1], r[:, 0])
    bt = np.mean(np.log1p(np.exp(-(chosen - rejected))))
    return bt + 1e-3 * abs(np.mean(r[:, 0] + r[:, 1])), np.mean(chosen > rejected)


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(16, 2)).astype(np.float32) * 3 + 2.0  # off-centre: term matters
    preference = rng.integers(1, 3, size=16).astype(np.int32)
    preference[3] = 0  # an invalid label counts nowhere
    valid = np.ones(16, bool)
    valid[5] = False  # a filler row counts nowhere
    loss_sum, sums = rm_model.preference_loss_sums(jnp.asarray(rewards), jnp.asarray(preference),
                                                 jnp.asarray(valid))
    keep = valid & (preference > 0)
    want, want_accuracy = numpy_loss(rewards, preference, keep)
    assert float(sums["weight"]) == keep.sum() == 14
    np.testing.assert_allclose(float(loss_sum) / 14, want, rtol=1e-6)
    np.testing.assert_allclose(float(sums["accuracy"]) / 14, want_accuracy, rtol=1e-6)
    # The centring term is there (the rewards are off-centre), and its gradient pushes the mean
    # of the rewards toward zero.
    centre = abs(np.mean(rewards[keep].sum(-1)))
    np.testing.assert_allclose(float(sums["center"]) / 14, centre, rtol=1e-6)
    grad = jax.grad(lambda r: rm_model.preference_loss_sums(
        r, jnp.asarray(preference), jnp.asarray(valid))[0])(jnp.asarray(rewards))
    assert float(jnp.sum(grad[keep])) > 0 and float(jnp.sum(grad[~keep] ** 2)) == 0


@pytest.fixture(scope="module")
def lora_model():
    """A tiny video LLM RM with a LoRA adapter whose B is non-zero (every adapter leaf then gets
    a gradient), as host arrays so that every mesh starts from the same values."""
    model = tiny_reward_model(lora_rank=4)
    host = host_variables(model)
    rng = np.random.default_rng(3)
    host["lora"] = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype) * 0.05,
                                host["lora"])
    return model, host


def test_score_is_read_at_the_real_last_token_under_left_and_right_padding(lora_model):
    """Left- and right-padded rows get the same score, which is the head applied to the hidden
    state of the row's last real token; pair_rewards scores each candidate as one row."""
    model, variables = lora_model
    rng = np.random.default_rng(1)
    lengths = (5, 9, 12, 16)
    rows = [np.concatenate([[1, IMAGE_ID], rng.integers(3, 96, size=n - 2)]).astype(np.int32)
            for n in lengths]
    frames = rng.integers(0, 256, size=(4, 2, 32, 32, 3)).astype(np.uint8)

    def padded(left, length=16):
        ids = np.zeros((4, length), np.int32)
        mask = np.zeros((4, length), np.int32)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = row, 1
        return {"input_ids": ids, "attention_mask": mask, "frames": frames,
                "has_video": np.ones(4, bool)}

    @jax.jit
    def forward(v, b):
        out = model.apply(v, b["input_ids"], b["attention_mask"], frames=b["frames"],
                          has_video=b["has_video"], compute_logits=False)
        return out.reward, out.last_hidden_state

    head = variables["params"]["reward_head"]["score"]
    left, left_hidden = jax.device_get(forward(variables, padded(left=True)))
    right, right_hidden = jax.device_get(forward(variables, padded(left=False)))
    last = np.array(lengths) - 1
    by_hand = right_hidden[np.arange(4), last] @ head["kernel"][:, 0] + head["bias"][0]
    np.testing.assert_allclose(right, by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(left, left_hidden[:, -1] @ head["kernel"][:, 0] + head["bias"][0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(left, right, rtol=1e-4, atol=1e-5)
    # Not read at the last slot of a right-padded row, nor at its first token.
    wrong = right_hidden[0, -1] @ head["kernel"][:, 0] + head["bias"][0]
    assert abs(wrong - right[0]) > 1e-4 and abs(right[0] - right[1]) > 1e-4

    # pair_rewards: pairs (rows 0, 1) and (rows 2, 3), each pair sharing one video.
    pair_frames = frames[[0, 2]]
    batch = padded(left=False)
    pairs = {"input_ids": batch["input_ids"].reshape(2, 2, 16),
             "attention_mask": batch["attention_mask"].reshape(2, 2, 16),
             "frames": pair_frames, "has_video": np.ones(2, bool)}
    same_video = dict(batch, frames=np.repeat(pair_frames, 2, axis=0))
    want, _ = jax.device_get(forward(variables, same_video))
    got = jax.device_get(jax.jit(lambda v, b: rm_model.pair_rewards(model, v, b))(variables, pairs))
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-5, atol=1e-5)


def test_likelihood_term_adds_the_responses_mean_log_probability(lora_model):
    """With likelihood_weight w the score is the head's plus w times the mean log-probability
    of the tokens under response_mask, each read from the logits of the position before it:
    checked by hand from the model's logits, under left and right padding."""
    model, variables = lora_model
    rng = np.random.default_rng(5)
    lengths, response = (9, 12, 14), ((4, 7), (5, 10), (3, 13))  # [start, end) of each response
    rows = [np.concatenate([[1, IMAGE_ID], rng.integers(3, 96, size=n - 2)]).astype(np.int32)
            for n in lengths]
    frames = rng.integers(0, 256, size=(3, 2, 32, 32, 3)).astype(np.uint8)
    weight = 0.7

    def padded(left, length=16):
        batch = {k: np.zeros((3, length), np.int32)
                 for k in ("input_ids", "attention_mask", "response_mask")}
        for i, (row, (a, b)) in enumerate(zip(rows, response)):
            offset = length - len(row) if left else 0
            batch["input_ids"][i, offset:offset + len(row)] = row
            batch["attention_mask"][i, offset:offset + len(row)] = 1
            batch["response_mask"][i, offset + a:offset + b] = 1
        return dict(batch, frames=frames, has_video=np.ones(3, bool))

    score = jax.jit(lambda v, b, w: rm_model.reward_scores(model, v, b, w), static_argnums=2)
    logits = jax.jit(lambda v, b: model.apply(v, b["input_ids"], b["attention_mask"],
                                              frames=b["frames"], has_video=b["has_video"]).logits)
    right = padded(left=False)
    head_only = np.asarray(score(variables, right, 0.0))
    all_logits = np.asarray(logits(variables, right), np.float64)
    logp = all_logits - np.log(np.exp(all_logits).sum(-1, keepdims=True))
    means = np.array([np.mean([logp[i, t - 1, right["input_ids"][i, t]] for t in range(a, b)])
                      for i, (a, b) in enumerate(response)])
    for batch in (right, padded(left=True)):
        got = np.asarray(score(variables, batch, weight))
        np.testing.assert_allclose(got, head_only + weight * means, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="response_mask"):
        score(variables, {k: v for k, v in right.items() if k != "response_mask"}, weight)


def _setup(model, sizes, host, tx):
    devices = jax.devices()[:1] if sizes == ONE else None
    mesh = make_mesh(sizes, devices)
    layout = state_lib.plan_state(init_fn(model), tx, mesh, DEFAULT_RULES,
                                  "lora/.*|params/reward_head/.*")
    state, frozen = state_lib.state_from_variables(layout, host, jax.random.PRNGKey(0))
    return layout, state, frozen, make_train_step(rm_model.make_rm_loss(model), layout,
                                                  optax.constant_schedule(LR))


def test_lora_rm_step_on_eight_devices_matches_one_device(lora_model):
    """Plain SGD, so that the update is -lr * gradient: the updates on (data 2, fsdp 2,
    tensor 2) and on one device agree to rtol 1e-5, as do the loss and the gradient norm."""
    model, host = lora_model
    batch = random_preference_batch(4, pairs=8)
    results = {}
    for name, sizes in (("one", ONE), ("eight", EIGHT)):
        layout, state, frozen, step = _setup(model, sizes, host, optax.sgd(LR))
        assert set(state.params) == {"lora", "params"}
        assert set(state.params["params"]) == {"reward_head"}  # the base is frozen
        before = jax.device_get(state.params)
        new_state, metrics = step(state, frozen, batch)
        grads = jax.tree.map(lambda new, old: (old - new) / LR,
                             jax.device_get(new_state.params), before)
        results[name] = (grads, jax.device_get(metrics))
    (g1, m1), (g8, m8) = results["one"], results["eight"]
    for key in ("loss", "bt_loss", "accuracy", "grad_norm", "weight"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
    assert m1["weight"] == 8 and m1["grad_norm"] > 0
    for path, a in jax.tree_util.tree_flatten_with_path(g8)[0]:
        b = jax.tree_util.tree_flatten_with_path(g1)[0]
        b = dict((jax.tree_util.keystr(k), v) for k, v in b)[jax.tree_util.keystr(path)]
        assert np.abs(b).max() > 0, path  # every trainable leaf gets a gradient
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(),
                                   err_msg=jax.tree_util.keystr(path))


def _pair(i, video, preference=1, truth=None, scores=(1.0, 0.0)):
    item = {"id": f"p{i}", "images": f"videos/{video}.mp4",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                              {"from": "gpt", "value": ""}],
            "output_1": {"value": "red"}, "output_2": {"value": "blue"},
            "preference": preference}
    if truth is not None:
        item.update(true_preference=truth, true_scores=list(scores))
    return item


def test_bad_preference_items_are_skipped_and_counted_and_videos_split():
    good = [_pair(i, f"v{i // 2}", preference=1 + i % 2, truth=2 - i % 2) for i in range(20)]
    no_output = dict(_pair(90, "v0"), output_2={"text": "blue"})
    missing = {k: v for k, v in _pair(91, "v0").items() if k != "output_1"}
    bad_label = [dict(_pair(92, "v0"), preference=p) for p in (0, 3, "1", None, True)]
    no_truth = _pair(93, "v1")  # usable with AI labels, not for the oracle
    items = good + [no_output, missing, *bad_label, no_truth, "not a dict", dict(good[0])]
    train, heldout, table, skipped = rm_data.split_preferences(items, "ai", 0.2, 500, seed=0)
    assert skipped == {"missing_output": 2, "invalid_preference": 5, "malformed": 1,
                       "duplicate_id": 1}
    assert len(train) + len(heldout) == 21 and len(heldout) == 4
    videos = lambda rows: {r["images"] for r in rows}  # noqa: E731
    assert not videos(train) & videos(heldout)  # held-out videos never seen in training
    assert table["p1"] == {"ai": 2, "truth": 1, "decisive": True, "longer": None}
    # The oracle control: the same pairs labelled by the truth; pairs without one are skipped.
    train, heldout, table, skipped = rm_data.split_preferences(items, "truth", 0.2, 2, seed=0)
    assert skipped["no_truth"] == 1 and len(heldout) == 2  # heldout_max caps the split
    assert all(r["preference"] == table[r["id"]]["truth"] for r in train + heldout)
    assert any(table[r["id"]]["ai"] != r["preference"] for r in train)
    # The context ablation: the judge's verdict without context; pairs without one are skipped.
    ablation = [dict(item, preference_no_context=3 - item["preference"]) for item in good]
    train, heldout, table, skipped = rm_data.split_preferences(
        ablation + [good[0] | {"id": "p99"}], "ai_no_context", 0.2, 500, seed=0)
    assert skipped == {"no_label_without_context": 1}
    assert all(r["preference"] != table[r["id"]]["ai"] for r in train + heldout)


def test_the_longer_answer_baseline_counts_words():
    pair = _pair(0, "v0")
    assert rm_data.longer_answer(pair) is None  # "red" / "blue": one word each
    pair["output_2"] = {"value": "a blue one"}
    assert rm_data.longer_answer(pair) == 2


def test_reward_model_rows_are_the_pipelines_preference_rows(
        preference_data, world_tokenizer):  # noqa: F811
    from rlaif_jax.data.pipeline import Pipeline

    pipe = Pipeline(preference_data, "train", world_tokenizer, 4, 160, shuffle=False)
    batch = pipe.batch(0)
    records = [pipe.record(i) for i in batch["index"]]
    question_turns = [{"from": "human", "value": r["values"][0]} for r in records]
    for candidate, key in ((0, "output_1"), (1, "output_2")):
        rows = rm_model.reward_model_rows(question_turns, [r[key] for r in records],
                                        world_tokenizer, 160)
        np.testing.assert_array_equal(rows["input_ids"], batch["input_ids"][:, candidate])
        np.testing.assert_array_equal(rows["attention_mask"],
                                      batch["attention_mask"][:, candidate])
        np.testing.assert_array_equal(rows["response_mask"],
                                      batch["response_mask"][:, candidate])
    user, prefix = prompts.rm_evaluation_prompt()
    text = world_tokenizer.decode(rows["input_ids"][0][rows["attention_mask"][0] > 0])
    assert text.rstrip().endswith(prefix) and user in text
