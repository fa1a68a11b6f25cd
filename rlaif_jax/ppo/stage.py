"""Stage 5, PPO: the policy-init model's adapter tuned against the reward model (WORKDIR/ppo),
or, for the control, against the synthetic world's true reward (WORKDIR/ppo_oracle).

A run is built from its config (`PPORun`): the actor-critic tree from the earlier stages'
checkpoints (ppo/init.py), the prompts (ppo/prompts.py), the trainer's jitted pieces
(ppo/trainer.py). The engine's loop runs its iterations (a step of the loop is one iteration:
sampling, scoring, minibatch updates) with checkpoints, SIGTERM resume, held-out evaluation and
the best checkpoint by `eval.key`; every `rollouts.sample_every` iterations a few rollouts go to
rollouts/<iteration>.json. The main job (rlaif_jax/main_job.py) runs the earlier stages first.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np
import transformers

from rlaif_jax.engine import optim
from rlaif_jax.engine.loop import LoopOptions, Stage, run_stage
from rlaif_jax.engine.state import plan_state, state_from_variables
from rlaif_jax.eval.synthetic_qa import HeldOutQA
from rlaif_jax.checkpoints.orbax_io import Checkpoints
from rlaif_jax.data.synthetic import load_truth
from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.parallel.sharding import make_rules
from rlaif_jax.ppo.init import load_actor_critic
from rlaif_jax.ppo.prompts import PromptSource, TruthScorer, prompt_pipeline, rm_suffix_ids
from rlaif_jax.ppo.trainer import PPOTrainer, ppo_optimizer, settings_from_config
from rlaif_jax.sft.stage import SyntheticSources
from rlaif_jax.workdir.files import atomic_write_json
from rlaif_jax.workdir.layout import PPO_STAGE, latest_step, stage_dir, world_dir, write_config

REWARDS = {"rm": "ppo", "truth": "ppo_oracle"}  # reward source -> stage directory


def rollout_rules(config):
    """The sampler's logical axis rules: the training rules with `config.rollout_rules`
    overriding entries (None when it overrides nothing: sampling uses the training layout)."""
    if not config.rollout_rules:
        return None
    return make_rules(tuple(config.rules) + tuple(config.rollout_rules))


def write_rollout_samples(path: str, rollout: dict, count: int,
                          decode: Optional[Callable[[np.ndarray], str]]):
    """The first `count` rollouts as {prompt, response, score, reward} (text when `decode`)."""
    host = jax.device_get({k: rollout[k] for k in ("prompt_ids", "prompt_mask", "response",
                                                    "mask", "score", "sequence_reward")})
    text = decode or (lambda ids: [int(i) for i in ids])
    records = []
    for row in range(min(count, len(host["response"]))):
        prompt = host["prompt_ids"][row][host["prompt_mask"][row].astype(bool)]
        response = host["response"][row][host["mask"][row].astype(bool)]
        records.append({"prompt": text(prompt), "response": text(response),
                        "score": float(host["score"][row]),
                        "reward": float(host["sequence_reward"][row])})
    atomic_write_json(path, records)


def iteration_stage(name: str, trainer: PPOTrainer, fresh_state, prompts, num_iterations: int,
                    seed: int, evaluate=None, eval_key: str = "eval/exact_match",
                    meta: Optional[dict] = None, samples_dir: str = "", sample_every: int = 0,
                    samples: int = 8, decode=None) -> Stage:
    """PPO iterations as a Stage of the engine's loop: step k samples the prompts of batch k
    (rng folded from `seed` and k, so a resumed run samples as an uninterrupted one)."""
    primary = jax.process_index() == 0

    def advance(state, frozen, local, iteration):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), iteration)
        state, metrics, rollout = trainer.iteration(
            state, frozen, local, rng, rng_seed=seed * 1_000_003 + iteration)
        metrics["train/optimizer_step"] = float(jax.device_get(state.step))
        done = iteration + 1
        if sample_every and done % sample_every == 0 and primary:
            write_rollout_samples(os.path.join(samples_dir, "rollouts", f"{done}.json"),
                                  rollout, samples, decode)
        return state, metrics

    return Stage(name=name, layout=trainer.layout, data=prompts, num_steps=num_iterations,
                 fresh_state=fresh_state, advance=advance, evaluate=evaluate,
                 meta=dict(meta or {}, stage=PPO_STAGE), unit="iteration", best_key=eval_key,
                 progress_keys=(("score", "rollout/score_mean"), ("kl", "rollout/kl")),
                 count_tokens=False)


class PPORun:
    """Everything one PPO run needs, built from its config (the models loaded on first use)."""

    def __init__(self, config, mesh, loaded=None):
        if config.reward not in REWARDS:
            raise ConfigError(f"reward={config.reward!r}: expected one of {sorted(REWARDS)} "
                              "('rm': RLAIF; 'truth': the synthetic world's scorer, the control)")
        self.config, self.mesh = config, mesh
        self.workdir = workdir = os.path.abspath(config.workdir)
        self.stage_dir = stage_dir(workdir, REWARDS[config.reward])
        self.world = world_dir(workdir, config.data.world)
        tokenizer_dir = os.path.join(self.world, "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            raise ConfigError(f"ppo: no synthetic world tokenizer at {tokenizer_dir} (run the SFT "
                              "stage first, or set data.world)")
        self.tokenizer = tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        self.rules = rules = make_rules(config.rules)
        # `loaded`: another run's models over the same checkpoints (the main job's control).
        self.loaded = loaded or load_actor_critic(
            workdir, config.init, config.rm_init, mesh, rules, tokenizer,
            config.value_lora.to_dict(), config.critic_shares_base, config.seed,
            config.full_finetune, config.model,
            config.critic_model if list(config.critic_model.keys()) else config.model)
        models = self.loaded.models
        policy_config = models.policy.config
        num_frames, size = policy_config.num_frames, policy_config.vision.image_size
        question_marks = tuple(tokenizer.encode("?", add_special_tokens=False))
        self.settings = settings_from_config(config, tokenizer.eos_token_id,
                                             tokenizer.pad_token_id, question_marks)
        tx, schedule = ppo_optimizer(config, self.settings)
        self.layout = plan_state(models.init_variables, tx, mesh, rules, models.trainable_regex(),
                                 "", config.max_replicated_share)
        pipeline = prompt_pipeline(
            self.world, os.path.join(workdir, "data", "ppo_prompts"), config.data.prompts_file,
            tokenizer, self.settings.rollout_batch_size, config.ppo.max_prompt_length,
            num_frames, size, config.seed)
        self.prompts = PromptSource(pipeline)
        score_fn = rm_suffix = None
        if config.reward == "truth":
            score_fn = TruthScorer(self.prompts, os.path.join(self.world, config.data.prompts_file),
                                   load_truth(self.world), tokenizer)
        else:
            rm_suffix = rm_suffix_ids(tokenizer)
        self.trainer = PPOTrainer(models, self.layout, self.settings, schedule, score_fn=score_fn,
                                  rm_suffix=rm_suffix, rollout_rules=rollout_rules(config))
        self._held_out = None

    def held_out(self) -> HeldOutQA:
        """Held-out QA of the policy init's world, as its SFT-stage config names it."""
        if self._held_out is None:
            sft_config = ml_collections.ConfigDict(self.loaded.policy_config)
            with sft_config.unlocked():
                sft_config.workdir = self.workdir
                sft_config.log.progress = False
            if not sft_config.eval.qa_files:
                raise ConfigError("ppo: the policy init's config names no held-out QA files")
            sources = SyntheticSources(sft_config)
            e = self.config.eval
            self._held_out = HeldOutQA(
                self.loaded.models.policy, sources.world, sources.eval, sft_config.eval.qa_files,
                self.tokenizer, e.batch_size, int(sft_config.data.max_length), e.max_new_tokens,
                e.num_qa, e.num_describe, self.mesh, self.rules)
        return self._held_out

    def fresh_state(self):
        return state_from_variables(self.layout, self.loaded.variables(),
                                    jax.random.PRNGKey(self.config.seed))

    def restore(self, directory: str):
        """The latest train state of a PPO stage directory of this run's layout."""
        manager = Checkpoints(os.path.join(directory, "checkpoints"), 1, 1, False)
        state, _ = manager.restore(latest_step(directory), self.layout.abstract_state_sharded)
        manager.close()
        return state

    def tree(self, state, frozen) -> dict:
        return optim.merge_trees(state.params, frozen)

    def evaluate(self, state, frozen) -> dict:
        variables = self.loaded.models.policy_variables(self.tree(state, frozen))
        metrics, _ = self.held_out()(variables)
        return metrics

    def finished(self) -> bool:
        latest = latest_step(self.stage_dir)
        return latest is not None and latest >= int(self.config.num_iterations)

    def stage(self) -> Stage:
        c = self.config
        meta = {"init": self.loaded.policy_step, "rm_init": self.loaded.rm_step,
                "reward": c.reward, "seed": c.seed, "config": c.to_dict()}
        return iteration_stage(
            os.path.basename(self.stage_dir), self.trainer, self.fresh_state, self.prompts,
            int(c.num_iterations), c.seed, self.evaluate if c.eval.every >= 0 else None,
            c.eval.key, json.loads(json.dumps(meta, default=str)), self.stage_dir,
            c.rollouts.sample_every, c.rollouts.samples,
            decode=lambda ids: self.tokenizer.decode([int(i) for i in ids],
                                                     skip_special_tokens=True))

    def run(self) -> dict:
        c = self.config
        if jax.process_index() == 0:
            write_config(self.stage_dir, c)
            m = self.loaded.models
            print(f"[{os.path.basename(self.stage_dir)}] reward={c.reward}; policy "
                  f"{self.loaded.policy_step}; RM {self.loaded.rm_step} (adapter: "
                  f"{m.rm_has_adapter}, critic shares the policy base: {m.critic_shares_base}); "
                  f"mesh {dict(self.mesh.shape)}; {c.num_iterations} iterations of "
                  f"{self.settings.rollout_batch_size} prompts from "
                  f"{self.prompts.pipeline.num_examples} (skipped: "
                  f"{dict(self.prompts.pipeline.skipped) or 'none'})", flush=True)
        options = LoopOptions(
            checkpoint_every=c.checkpoint.every, keep_checkpoints=c.checkpoint.keep,
            async_checkpoints=c.checkpoint.async_save, log_every=1, eval_every=c.eval.every,
            tensorboard=c.log.tensorboard, progress=c.log.progress)
        return run_stage(self.stage(), self.stage_dir, options)


def run_ppo(config, mesh, loaded=None) -> tuple[PPORun, dict]:
    """One PPO run (reward from config.reward), resumed from its checkpoints (nothing is redone
    once it reached config.num_iterations). Returns the run (its models, loaded or not, serve
    the main job's control and table) and its last metrics ({} when it was done already)."""
    ppo_run = PPORun(config, mesh, loaded)
    name = os.path.basename(ppo_run.stage_dir)
    if ppo_run.finished():
        print(f"[{name}] done already (iteration {config.num_iterations}): not redoing it",
              flush=True)
        return ppo_run, {}
    results = ppo_run.run()
    if jax.process_index() == 0 and results:
        print(f"[{name}] done: " + json.dumps({k: round(v, 4) for k, v in sorted(results.items())}),
              flush=True)
    return ppo_run, results


def run(config, mesh) -> dict:
    """The PPO stage alone (the earlier stages' outputs must exist); its last metrics."""
    return run_ppo(config, mesh)[1]
