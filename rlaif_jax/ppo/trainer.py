"""Stage 5: one PPO iteration from AI feedback, as sharded jitted pieces.

An iteration over a rollout batch of prompts:

1. video tokens, computed once (vision towers frozen) and reused by every later pass;
2. sampling with the KV-cache sampler (rollout micro-batches, optionally another weight layout),
   then truncation after the first EOS (the reference's "?" truncation behind a flag);
3. one jitted pass per rollout micro-batch: old and reference log-probs, values, RM scores
   (or a host `score_fn`, e.g. the synthetic world's scorer for the true-reward control);
4. one jitted pass over the whole rollout batch: reward shaping, masked GAE, whitening (global:
   the batch is one sharded array);
5. epochs of minibatch updates through the engine's train step: policy and value losses summed,
   one global grad-norm clip over both, one AdamW step (train micro-batches accumulate exactly).

The iteration owns no I/O; `ppo/loop.py` runs iterations with checkpoints, metrics, rollout
samples, held-out evaluation and the best checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rlaif_jax.parallel import sharding as sharding_lib
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.parallel.sharding import BATCH_AXES
from rlaif_jax.sampling.generate import SamplingConfig, generate
from rlaif_jax.ppo import rl_math as ppo_math
from rlaif_jax.engine.optim import make_optimizer, merge_trees
from rlaif_jax.ppo.actor_critic import ActorCritic
from rlaif_jax.engine.state import StateLayout, TrainState
from rlaif_jax.parallel.sharding import mesh_context
from rlaif_jax.engine.step import make_train_step

# A host scorer: the rollout (numpy arrays: 'prompt_ids', 'prompt_mask', 'response', 'mask',
# 'index', ...) -> scores [B]. The reward model instead runs on device (`score_with_rm`).
ScoreFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """One PPO run's settings, built from a config's `ppo` section (`settings_from_config`
    below); configs/ppo.py holds the defaults, the reference trainer's unless a preset
    says otherwise."""

    rollout_batch_size: int  # prompts an iteration (one sample each)
    rollout_micro_batch: int  # prompts a sampling / scoring pass
    minibatch_size: int  # rollouts an optimizer step
    train_micro_batch: int  # rollouts a forward/backward (0: the whole minibatch)
    epochs: int
    max_new_tokens: int
    temperature: float
    kl_coef: float
    kl_estimator: str  # rl_math.KL_ESTIMATORS
    no_eos_penalty: float
    length_penalty: float
    reward_scale: float
    gamma: float
    lam: float
    clip: float
    value_clip: float
    value_coef: float
    reference_pads: bool  # the reference's pad behaviour, everywhere
    truncate_at_question_mark: bool  # the reference's "?" quirk
    prompt_bucket: int
    eos_token_id: int  # the tokenizer's
    pad_token_id: int
    question_mark_ids: tuple = ()  # the tokenizer's ids of "?" (only with the "?" quirk)

    def __post_init__(self):
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.rollout_batch_size={self.rollout_batch_size} must be a "
                              f"multiple of ppo.minibatch_size={self.minibatch_size}")
        if self.rollout_batch_size % self.rollout_micro_batch:
            raise ConfigError(f"ppo.rollout_batch_size={self.rollout_batch_size} must be a "
                              f"multiple of ppo.rollout_micro_batch={self.rollout_micro_batch}")
        micro = self.train_micro_batch or self.minibatch_size
        if self.minibatch_size % micro:
            raise ConfigError(f"ppo.minibatch_size={self.minibatch_size} must be a multiple of "
                              f"ppo.train_micro_batch={micro}")
        if self.kl_estimator not in ppo_math.KL_ESTIMATORS:
            raise ConfigError(f"ppo.kl_estimator={self.kl_estimator!r}: expected one of "
                              f"{ppo_math.KL_ESTIMATORS}")

    @property
    def accum_steps(self) -> int:
        return self.minibatch_size // (self.train_micro_batch or self.minibatch_size)

    @property
    def steps_per_iteration(self) -> int:
        return self.epochs * (self.rollout_batch_size // self.minibatch_size)

    @property
    def stop_ids(self) -> tuple:
        return tuple(self.question_mark_ids) if self.truncate_at_question_mark else ()

    def check_mesh(self, mesh):
        rows = sharding_lib.batch_divisor(mesh)
        for name in ("rollout_micro_batch", "minibatch_size"):
            if getattr(self, name) % rows:
                raise ConfigError(f"ppo.{name}={getattr(self, name)} must be a multiple of the "
                                  f"mesh's data*fsdp = {rows}")
        micro = self.train_micro_batch or self.minibatch_size
        if micro % rows:
            raise ConfigError(f"ppo.train_micro_batch={micro} must be a multiple of the mesh's "
                              f"data*fsdp = {rows}")


def settings_from_config(config, eos_token_id: int, pad_token_id: int,
                         question_mark_ids: tuple = ()) -> PPOSettings:
    """The `ppo` section of a PPO config as PPOSettings. Here, beside the trainer, rather than in
    the stage, so that tools which only build the trainer (benchmarks/memory_plan.py) do not
    import the data pipeline."""
    fields = {k: v for k, v in config.ppo.to_dict().items() if k != "max_prompt_length"}
    return PPOSettings(eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       question_mark_ids=tuple(question_mark_ids), **fields)


def ppo_optimizer(config, settings: PPOSettings):
    """AdamW with one global clip; warmup and cosine counted in iterations (the reference warms
    up over 5 iterations), converted to optimizer steps (epochs x minibatches an iteration)."""
    per_iteration = settings.steps_per_iteration
    values = config.optim.to_dict()
    values["warmup_steps"] = int(values.pop("warmup_iterations")) * per_iteration
    return make_optimizer(values, int(config.num_iterations) * per_iteration)


class PPOTrainer:
    """The jitted pieces of an iteration for one layout (mesh + shardings of the tree)."""

    def __init__(self, models: ActorCritic, layout: StateLayout, settings: PPOSettings,
                 schedule: optax.Schedule, score_fn: Optional[ScoreFn] = None,
                 rm_suffix: Optional[Sequence[int]] = None, rollout_rules=None):
        settings.check_mesh(layout.mesh)
        if score_fn is None and rm_suffix is None:
            raise ConfigError("PPO needs a reward: the reward model (with its evaluation-prompt "
                              "tokens) or a score function")
        self.models, self.layout, self.settings = models, layout, settings
        self.score_fn = score_fn
        self.rm_suffix = None if rm_suffix is None else np.asarray(rm_suffix, np.int32)
        self.mesh = layout.mesh
        self.sampling = SamplingConfig(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            num_samples=1, eos_token_id=settings.eos_token_id,
            pad_token_id=settings.pad_token_id, prompt_bucket=settings.prompt_bucket)
        self.rollout_rules = tuple(rollout_rules) if rollout_rules else layout.rules
        self.train_step = make_train_step(self._loss_fn, layout, schedule, settings.accum_steps)
        self._batch = NamedSharding(self.mesh, P(BATCH_AXES))
        self._replicated = NamedSharding(self.mesh, P())
        params_shardings = (layout.state_shardings.params, layout.frozen_shardings)
        self._experience = jax.jit(self._experience_fn,
                                   in_shardings=params_shardings + (self._batch,),
                                   out_shardings=self._batch)
        self._encode = jax.jit(self._encode_fn, in_shardings=params_shardings + (self._batch,),
                               out_shardings=self._batch)
        self._advantages = jax.jit(self._advantages_fn, in_shardings=(self._batch,),
                                   out_shardings=(self._batch, self._replicated))
        self._truncate = jax.jit(self._truncate_fn, in_shardings=(self._batch,),
                                 out_shardings=self._batch)
        self._take = jax.jit(lambda tree, rows: jax.tree.map(lambda x: x[rows], tree),
                             in_shardings=(self._batch, self._replicated),
                             out_shardings=self._batch)
        self._concat = jax.jit(_concat, out_shardings=self._batch)

    # -----------------------------------------------------------------------------------------
    # Jitted bodies

    def _tree(self, params, frozen):
        return merge_trees(params, frozen)

    def _encode_fn(self, params, frozen, frames):
        tree = self._tree(params, frozen)
        out = {"video_tokens": self.models.encode_video(tree, frames)}
        if not self.models.critic_shares_base:
            out["critic_video_tokens"] = self.models.encode_video(tree, frames, critic=True)
        return out

    def _truncate_fn(self, generated):
        tokens, mask, has_eos = ppo_math.truncate_at_stop(
            generated["tokens"], generated["mask"], self.settings.eos_token_id,
            self.settings.pad_token_id, self.settings.stop_ids)
        return {"response": tokens, "mask": mask, "has_eos": has_eos}

    def _experience_fn(self, params, frozen, batch):
        """Old and reference log-probs, values (and RM scores) of one rollout micro-batch."""
        tree = self._tree(params, frozen)
        t = self.settings.temperature
        old, entropy = self.models.policy_outputs(tree, batch, temperature=t)
        ref, _ = self.models.policy_outputs(tree, batch, reference=True, temperature=t)
        out = {"old_logprobs": old, "ref_logprobs": ref,
               "old_values": self.models.values(tree, batch), "rollout_entropy": entropy}
        if self.rm_suffix is not None and self.score_fn is None:
            out["score"] = self.models.rm_scores(tree, batch, self.rm_suffix)
        return out

    def _advantages_fn(self, rollout):
        s = self.settings
        mask = rollout["mask"]
        if not s.reference_pads:  # nothing computed at a pad may leak in
            for key in ("old_logprobs", "ref_logprobs", "old_values"):
                rollout[key] = rollout[key] * mask
        shaped = ppo_math.shape_rewards(
            rollout["score"], rollout["old_logprobs"], rollout["ref_logprobs"], mask,
            rollout["has_eos"], kl_coef=s.kl_coef, kl_estimator=s.kl_estimator,
            no_eos_penalty=s.no_eos_penalty, length_penalty=s.length_penalty,
            max_length=s.max_new_tokens, reward_scale=s.reward_scale,
            reference_pads=s.reference_pads)
        advantages, returns = ppo_math.advantages_and_returns(
            shaped["rewards"], rollout["old_values"], mask, gamma=s.gamma, lam=s.lam,
            reference_pads=s.reference_pads)
        rollout = dict(rollout, advantages=advantages, returns=returns,
                       sequence_reward=shaped["sequence_reward"])
        real = mask.astype(jnp.float32)
        lengths = jnp.sum(real, axis=1)
        score = rollout["score"].astype(jnp.float32)
        metrics = {
            "rollout/score_mean": jnp.mean(score), "rollout/score_std": jnp.std(score),
            "rollout/reward_mean": jnp.mean(shaped["sequence_reward"]),
            "rollout/reward_std": jnp.std(shaped["sequence_reward"]),
            "rollout/kl": jnp.mean(jnp.sum(shaped["kl"], axis=1)),
            "rollout/kl_per_token": ppo_math.masked_mean(shaped["kl"], real),
            "rollout/entropy": ppo_math.masked_mean(rollout["rollout_entropy"], real),
            "rollout/response_length": jnp.mean(lengths),
            "rollout/eos_rate": jnp.mean(rollout["has_eos"].astype(jnp.float32)),
            "rollout/value_mean": ppo_math.masked_mean(rollout["old_values"], real),
            "rollout/return_mean": ppo_math.masked_mean(returns, real),
        }
        return rollout, metrics

    def _loss_fn(self, variables, batch, rng):
        del rng  # no dropout
        logp, entropy = self.models.policy_outputs(variables, batch,
                                                   temperature=self.settings.temperature)
        values = self.models.values(variables, batch)
        s = self.settings
        return ppo_math.ppo_loss_sums(logp, values, entropy, batch, clip=s.clip,
                                      value_clip=s.value_clip, value_coef=s.value_coef,
                                      reference_pads=s.reference_pads)

    # -----------------------------------------------------------------------------------------
    # Host orchestration

    def _put(self, array):
        return sharding_lib.global_batch({"x": array}, self.mesh)["x"]

    def policy_variables(self, state: TrainState, frozen) -> dict:
        """The policy's variables for sampling, in the rollout layout (`rollout_rules`)."""
        tree = merge_trees(state.params, frozen)
        variables = self.models.policy_variables(tree)
        if self.rollout_rules == self.layout.rules:
            return variables
        abstract = jax.eval_shape(self.models.init_variables, jax.ShapeDtypeStruct((2,), jnp.uint32))
        shardings = sharding_lib.mesh_shardings(abstract, self.mesh, self.rollout_rules)
        return jax.device_put(variables, self.models.policy_variables(shardings))

    def prepare(self, state: TrainState, frozen, prompts: Mapping[str, np.ndarray]) -> dict:
        """Global arrays of the prompt batch, with the video tokens computed once."""
        batch = {"prompt_ids": self._put(prompts["input_ids"]),
                 "prompt_mask": self._put(prompts["attention_mask"])}
        if "index" in prompts:
            batch["index"] = self._put(prompts["index"])
        if self.models.is_video:
            batch["has_video"] = self._put(np.asarray(prompts["has_video"], bool))
            with mesh_context(self.mesh, self.layout.rules):
                batch.update(self._encode(state.params, frozen, self._put(prompts["frames"])))
        return batch

    def _rows(self, batch: dict, start: int, stop: int) -> dict:
        rows = jnp.arange(start, stop)
        with mesh_context(self.mesh, self.layout.rules):
            return self._take(batch, jax.device_put(rows, self._replicated))

    def sample(self, state: TrainState, frozen, batch: dict, rng: jax.Array) -> dict:
        """Responses of the policy to every prompt of `batch` (rollout micro-batches), truncated:
        'response' [B, T], 'mask' [B, T], 'has_eos' [B]."""
        variables = self.policy_variables(state, frozen)
        size = self.settings.rollout_micro_batch
        total = batch["prompt_ids"].shape[0]
        parts = []
        for number, start in enumerate(range(0, total, size)):
            chunk = self._rows(batch, start, start + size)
            prompts = {"input_ids": chunk["prompt_ids"], "attention_mask": chunk["prompt_mask"]}
            if "has_video" in chunk:
                prompts["has_video"] = chunk["has_video"]
            generated = generate(self.models.policy, variables, prompts,
                                 jax.random.fold_in(rng, number), self.sampling,
                                 video_tokens=chunk.get("video_tokens"), mesh=self.mesh,
                                 rules=self.rollout_rules)
            parts.append({"tokens": generated.tokens, "mask": generated.mask})
        with mesh_context(self.mesh, self.layout.rules):
            return self._truncate(self._concat(parts))

    def experience(self, state: TrainState, frozen, batch: dict, responses: dict) -> tuple:
        """The rollout batch ready for training (advantages, returns, old values and
        log-probs) and its metrics. `responses` as from `sample` (or fixed, for tests)."""
        batch = dict(batch, **responses)
        size = self.settings.rollout_micro_batch
        total = batch["prompt_ids"].shape[0]
        parts = []
        for start in range(0, total, size):
            chunk = self._rows(batch, start, start + size)
            with mesh_context(self.mesh, self.layout.rules):
                out = self._experience(state.params, frozen, chunk)
            if self.score_fn is not None:
                host = {k: np.asarray(jax.device_get(v)) for k, v in chunk.items()
                        if k not in ("video_tokens", "critic_video_tokens")}
                out["score"] = self._put(np.asarray(self.score_fn(host), np.float32))
            parts.append(out)
        with mesh_context(self.mesh, self.layout.rules):
            batch.update(self._concat(parts))
            return self._advantages(batch)

    def update(self, state: TrainState, frozen, rollout: dict, rng_seed: int) -> tuple:
        """Epochs of minibatch steps over the rollout batch; returns (state, mean metrics)."""
        s = self.settings
        keys = ("prompt_ids", "prompt_mask", "response", "mask", "old_logprobs", "old_values",
                "advantages", "returns", "has_video", "video_tokens", "critic_video_tokens")
        train = {k: rollout[k] for k in keys if k in rollout}
        total = train["prompt_ids"].shape[0]
        sums: dict = {}
        for epoch in range(s.epochs):
            order = np.random.default_rng([rng_seed, epoch]).permutation(total)
            for start in range(0, total, s.minibatch_size):
                rows = jax.device_put(jnp.asarray(order[start:start + s.minibatch_size]),
                                      self._replicated)
                with mesh_context(self.mesh, self.layout.rules):
                    minibatch = self._take(train, rows)
                state, metrics = self.train_step(state, frozen, minibatch)
                for k, v in metrics.items():
                    sums.setdefault(k, []).append(v)
        fetched = jax.device_get(sums)
        return state, {f"train/{k}": float(np.mean(v)) for k, v in fetched.items()}

    def iteration(self, state: TrainState, frozen, prompts: Mapping[str, np.ndarray],
                  rng: jax.Array, rng_seed: int) -> tuple[TrainState, dict, dict]:
        """One PPO iteration: (state, metrics, the rollout batch on device)."""
        batch = self.prepare(state, frozen, prompts)
        responses = self.sample(state, frozen, batch, rng)
        rollout, rollout_metrics = self.experience(state, frozen, batch, responses)
        state, train_metrics = self.update(state, frozen, rollout, rng_seed)
        metrics = {k: float(v) for k, v in jax.device_get(rollout_metrics).items()}
        metrics.update(train_metrics)
        return state, metrics, rollout


def _concat(parts: list[dict]) -> dict:
    return {k: jnp.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
