"""PPO iterations on a tiny text LLaMA: sharded equals one device, and the reward goes up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaif_jax.parallel.mesh import make_mesh
from rlaif_jax.parallel.sharding import make_rules
from rlaif_jax.engine import optim
from rlaif_jax.ppo.trainer import PPOTrainer
from rlaif_jax.ppo.actor_critic import ActorCritic
from rlaif_jax.engine.state import init_state, plan_state
from tests.support import ppo_settings, tiny_llama

VOCAB, PROMPT, NEW, TARGET = 128, 6, 8, 5


def build(mesh_sizes, settings, score_fn=None, lr=1e-3, devices=None, full_finetune=False,
          vocab=VOCAB):
    mesh = make_mesh(mesh_sizes, devices)
    policy = tiny_llama(lora_rank=4 if not full_finetune else 0, vocab_size=vocab)
    critic = tiny_llama(lora_rank=4, vocab_size=vocab)
    models = ActorCritic(policy=policy, critic=critic if full_finetune else policy,
                         critic_shares_base=not full_finetune, full_finetune=full_finetune)
    tx, schedule = optim.make_optimizer(
        dict(lr=lr, warmup_steps=0, schedule="constant", grad_clip=1.0), 100)
    rules = make_rules()
    layout = plan_state(models.init_variables, tx, mesh, rules, models.trainable_regex(),
                        max_replicated_share=1.0)
    state, frozen = init_state(layout, models.init_variables, jax.random.PRNGKey(0))
    trainer = PPOTrainer(models, layout, settings, schedule, score_fn=score_fn,
                         rm_suffix=None if score_fn else [9, 10, 11])
    return trainer, state, frozen


def prompts(seed, rows, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(rows, PROMPT)).astype(np.int32)
    mask = np.ones_like(ids)
    for r in range(rows):  # left padding
        pad = rng.integers(0, PROMPT - 2)
        ids[r, :pad], mask[r, :pad] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "index": np.arange(rows, dtype=np.int32)}


def fixed_responses(seed, rows):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(rows, NEW)).astype(np.int32)
    mask = np.ones_like(tokens)
    for r in range(rows):
        end = rng.integers(2, NEW + 1)
        if r % 3:
            tokens[r, end - 1] = 2  # EOS
        tokens[r, end:], mask[r, end:] = 0, 0
    return {"response": tokens, "mask": mask, "has_eos": (tokens == 2).any(1)}


@pytest.mark.parametrize("reference_pads", [False, True])
def test_iteration_sharded_matches_single_device(reference_pads):
    settings = ppo_settings(rollout_batch_size=16, rollout_micro_batch=8, minibatch_size=8,
                           train_micro_batch=4, epochs=2, max_new_tokens=NEW,
                           reference_pads=reference_pads)
    results = []
    for sizes, devices in (({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                           ({"data": 2, "fsdp": 2, "tensor": 2}, None)):
        trainer, state, frozen = build(sizes, settings, devices=devices)
        batch = trainer.prepare(state, frozen, prompts(0, 16))
        responses = {k: trainer._put(v) for k, v in fixed_responses(1, 16).items()}
        rollout, rollout_metrics = trainer.experience(state, frozen, batch, responses)
        start = jax.device_get(state.params)
        state, train_metrics = trainer.update(state, frozen, rollout, rng_seed=3)
        results.append((jax.device_get(rollout), jax.device_get(rollout_metrics), train_metrics,
                        jax.device_get(state.params), start, len(state.params["value"]["head"]["score"]
                                                          ["kernel"].sharding.device_set)))
    (r1, m1, t1, p1, s1, n1), (r8, m8, t8, p8, _, n8) = results
    assert n1 == 1 and n8 == 8
    for key in ("advantages", "returns", "old_logprobs", "ref_logprobs", "old_values", "score"):
        np.testing.assert_allclose(r8[key], r1[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for key in m1:
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for key in ("train/loss", "train/pg_loss", "train/vf_loss", "train/grad_norm"):
        np.testing.assert_allclose(t8[key], t1[key], rtol=1e-4, err_msg=key)
    # Two steps of Adam at lr 1e-3: parameters agree to well under a step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), p8, p1)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), p1, s1))
    assert min(moved) > 1e-4  # every trainable leaf moved: policy adapter and value model
    # The rollout is whitened over the global batch, at real tokens only unless reference_pads.
    steps = np.ones_like(r1["mask"]) if reference_pads else r1["mask"]
    kept = r1["advantages"][steps.astype(bool)]
    assert abs(kept.mean()) < 1e-4 and abs(kept.std() - 1) < 1e-3
    if not reference_pads:
        assert np.all(r1["advantages"][r1["mask"] == 0] == 0)
    # At the start the policy IS the reference and the old policy: KL and ratio are exact.
    np.testing.assert_allclose(r1["old_logprobs"], r1["ref_logprobs"], atol=1e-6)


def test_ppo_on_a_true_reward_raises_it():
    """A host score function (the true-reward control's interface): fraction of TARGET tokens."""

    def score_fn(rollout):
        real = rollout["mask"].astype(bool)
        hits = (rollout["response"] == TARGET) & real
        return hits.sum(1) / np.maximum(real.sum(1), 1)

    settings = ppo_settings(rollout_batch_size=32, rollout_micro_batch=16, minibatch_size=16,
                           epochs=2, max_new_tokens=NEW, kl_coef=0.01, no_eos_penalty=0.0,
                           length_penalty=0.0, reward_scale=10.0)
    trainer, state, frozen = build({"data": 2, "fsdp": 4, "tensor": 1}, settings, score_fn,
                                   lr=1e-2, vocab=16)
    scores = []
    for iteration in range(6):
        state, metrics, _ = trainer.iteration(state, frozen, prompts(iteration, 32, 16),
                                              jax.random.PRNGKey(iteration), iteration)
        scores.append(metrics["rollout/score_mean"])
        assert np.isfinite(metrics["train/loss"])
    assert np.mean(scores[-2:]) > np.mean(scores[:2]) + 0.05, scores
    assert metrics["rollout/kl"] >= 0


class PromptSource:
    def __init__(self, rows):
        self.rows = rows

    def batch(self, iteration):
        return prompts(100 + iteration, self.rows)


def test_loop_sigterm_resumes_where_it_stopped(tmp_path):
    import json
    import os
    import signal

    from rlaif_jax.engine.loop import LoopOptions, Preempted, run_stage
    from rlaif_jax.ppo.stage import iteration_stage

    settings = ppo_settings(rollout_batch_size=8, rollout_micro_batch=8, minibatch_size=8,
                            epochs=1, max_new_tokens=NEW)
    trainer, _, _ = build({"data": 2, "fsdp": 4, "tensor": 1}, settings)

    def fresh():
        return init_state(trainer.layout, trainer.models.init_variables, jax.random.PRNGKey(0))

    def evaluate(state, frozen):  # any number that the updates move
        return {"eval/score": -float(np.abs(jax.device_get(
            state.params["value"]["head"]["score"]["bias"])).sum())}

    options = LoopOptions(checkpoint_every=1, keep_checkpoints=2, async_checkpoints=False,
                          log_every=1, eval_every=1, tensorboard=False, progress=False)

    def stage(directory, stop_at=None):
        ppo = iteration_stage("ppo", trainer, fresh, PromptSource(8), 3, seed=0,
                              evaluate=evaluate, eval_key="eval/score", samples_dir=directory,
                              sample_every=2, samples=3)
        if stop_at is not None:  # SIGTERM arrives during iteration `stop_at`
            advance = ppo.advance

            def interrupted_advance(state, frozen, local, iteration):
                if iteration + 1 == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return advance(state, frozen, local, iteration)

            ppo.advance = interrupted_advance
        return ppo

    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(Preempted) as stopped:
        run_stage(stage(interrupted, stop_at=2), interrupted, options)
    assert stopped.value.step == 2
    assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == ["1", "2"]
    run_stage(stage(interrupted), interrupted, options)
    straight = str(tmp_path / "straight")
    run_stage(stage(straight), straight, options)

    def final_params(directory):
        from rlaif_jax.checkpoints.orbax_io import Checkpoints
        manager = Checkpoints(os.path.join(directory, "checkpoints"), 1, 2, False)
        state, meta = manager.restore(3, trainer.layout.abstract_state_sharded)
        manager.close()
        assert meta["iteration"] == 3
        return jax.device_get(state.params), int(state.step)

    (resumed, steps_a), (plain, steps_b) = final_params(interrupted), final_params(straight)
    assert steps_a == steps_b == 3  # one optimizer step an iteration here
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), resumed, plain)
    records = [json.loads(line) for line in open(os.path.join(interrupted, "metrics.jsonl"))]
    iterations = [r["step"] for r in records if "rollout/score_mean" in r]
    assert iterations == [1, 2, 3]  # iteration 3 ran once, after the resume; none repeated
    samples = json.load(open(os.path.join(interrupted, "rollouts", "2.json")))
    assert len(samples) == 3 and set(samples[0]) == {"prompt", "response", "score", "reward"}
    best = json.load(open(os.path.join(interrupted, "best.json")))
    evals = {r["step"]: r["eval/score"] for r in records if "eval/score" in r}
    assert best["value"] == max(evals.values()) and best["iteration"] == max(evals, key=evals.get)
    assert os.listdir(os.path.join(interrupted, "best")) == [str(best["iteration"])]
