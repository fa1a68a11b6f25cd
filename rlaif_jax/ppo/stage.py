"""The PPO stage from a config, and the main job's chain of earlier stages.

`python launch/main.py --config=configs/ppo.py` runs, in order, every stage whose output is
missing from the workdir (each announced), then PPO on the reward model (WORKDIR/ppo), then the
controls (PPO on the synthetic world's true reward: WORKDIR/ppo_oracle), then the held-out table
(SFT, policy init, RLAIF, the true-reward control, the blind baseline; graded by the world's
scorer), written to WORKDIR/eval/<row>/results.json (the report reads them) and printed. A stage
that has its output is not redone; a stage that stopped midway resumes from its own checkpoints;
a table row already computed from the same checkpoint is read back.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import ml_collections

from rlaif_jax.parallel.mesh import ConfigError
from rlaif_jax.engine import optim
from rlaif_jax.ppo.trainer import PPOSettings

# (stage, config module, preset for each ppo preset): what PPO needs, in the order it is made.
CHAIN = (
    ("sft", "configs.sft", {"tiny": "tiny", "smoke": "smoke"}),
    ("policy_init", "configs.sft", {"tiny": "policy_init_tiny", "smoke": "policy_init_smoke"}),
    ("feedback", "configs.feedback", {"tiny": "tiny", "smoke": "smoke"}),
    ("rm", "configs.rm", {"tiny": "tiny", "smoke": "smoke"}),
)
# Overrides of those presets within the chain. The tiny and smoke SFT models judge near 50/50
# on every pair (measured on tiny: mean confidence 0.502), so feedback's confidence margin of
# 0.1 would leave the RM no pair at all: the chain keeps every judged pair.
CHAIN_OVERRIDES = {("feedback", "smoke"): {"margin": 0.0}, ("feedback", "tiny"): {"margin": 0.0}}
REWARDS = {"rm": "ppo", "truth": "ppo_oracle"}  # reward source -> stage directory


def settings_from_config(config, eos_token_id: int, pad_token_id: int,
                         question_mark_ids: tuple = ()) -> PPOSettings:
    fields = {k: v for k, v in config.ppo.to_dict().items() if k != "max_prompt_length"}
    return PPOSettings(eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                       question_mark_ids=tuple(question_mark_ids), **fields)


def rollout_rules(config):
    """The sampler's logical axis rules: the training rules with `config.rollout_rules`
    overriding entries (None when it overrides nothing: sampling uses the training layout)."""
    from rlaif_jax.parallel.sharding import make_rules

    if not config.rollout_rules:
        return None
    return make_rules(tuple(config.rules) + tuple(config.rollout_rules))


def ppo_optimizer(config, settings: PPOSettings):
    """AdamW with one global clip; warmup and cosine counted in iterations (SPEC.md: 5 warmup
    iterations), converted to optimizer steps (epochs x minibatches an iteration)."""
    per_iteration = settings.steps_per_iteration
    values = config.optim.to_dict()
    values["warmup_steps"] = int(values.pop("warmup_iterations")) * per_iteration
    return optim.make_optimizer(values, int(config.num_iterations) * per_iteration)


def stage_done(workdir: str, stage: str) -> bool:
    """Whether WORKDIR/<stage> holds a finished output (a checkpoint, or the feedback file)."""
    directory = os.path.join(workdir, stage)
    if stage == "feedback":
        return os.path.isfile(os.path.join(directory, "preferences.json"))
    checkpoints = os.path.join(directory, "checkpoints")
    return os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))


def chain_preset(config) -> str:
    """Which preset of the earlier stages matches this PPO config (tiny or smoke)."""
    return config.chain_preset or ("smoke" if int(config.num_iterations) <= 4 else "tiny")


def run_missing_stages(config, run_stage_config) -> list[str]:
    """Runs every stage of CHAIN whose output is missing, in order; returns the ones it ran.
    `run_stage_config(stage_config)` runs one stage (launch/main.py's `run`)."""
    workdir = os.path.abspath(config.workdir)
    ran = []
    for stage, module_name, presets in CHAIN:
        if stage_done(workdir, stage):
            print(f"[main] {os.path.join(workdir, stage)} is done: not redoing stage {stage}",
                  flush=True)
            continue
        preset = presets[chain_preset(config)]
        try:
            module = importlib.import_module(module_name)
            stage_config = module.get_config(preset)
        except (ImportError, ValueError) as e:
            raise ConfigError(
                f"the main job needs stage {stage!r} ({module_name.replace('.', '/')}.py:"
                f"{preset}), which this checkout cannot run ({e}); run it or set "
                f"--config.init / --config.rm_init to existing checkpoints") from None
        with stage_config.unlocked():
            stage_config.workdir = workdir
            stage_config.seed = config.seed
            stage_config.log.progress = config.log.progress
            stage_config.log.tensorboard = config.log.tensorboard
            for key, value in CHAIN_OVERRIDES.get((stage, chain_preset(config)), {}).items():
                stage_config[key] = value
        print(f"[main] {os.path.join(workdir, stage)} has no output: running stage {stage} "
              f"first ({module_name.replace('.', '/')}.py:{preset})", flush=True)
        run_stage_config(stage_config)
        ran.append(stage)
    return ran


# ---------------------------------------------------------------------------------------------
# One PPO run


class PPORun:
    """Everything one PPO run needs, built from its config (nothing loaded until asked)."""

    def __init__(self, config, mesh, loaded=None):
        import transformers

        from rlaif_jax.parallel.sharding import make_rules
        from rlaif_jax.ppo.trainer import PPOTrainer
        from rlaif_jax.ppo.init import load_actor_critic
        from rlaif_jax.ppo.prompts import (PromptSource, TruthScorer, prompt_pipeline,
                                               rm_suffix_ids)
        from rlaif_jax.engine.state import plan_state

        if config.reward not in REWARDS:
            raise ConfigError(f"reward={config.reward!r}: expected one of {sorted(REWARDS)} "
                              "('rm': RLAIF; 'truth': the synthetic world's scorer, the control)")
        self.config, self.mesh = config, mesh
        workdir = os.path.abspath(config.workdir)
        self.workdir = workdir
        self.stage_dir = os.path.join(workdir, REWARDS[config.reward])
        self.world = (os.path.abspath(config.data.world) if config.data.world
                      else os.path.join(workdir, "data", "world"))
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
            from rlaif_jax.ppo.prompts import load_truths
            score_fn = TruthScorer(self.prompts, os.path.join(self.world, config.data.prompts_file),
                                   load_truths(self.world), tokenizer)
        else:
            rm_suffix = rm_suffix_ids(tokenizer)
        self.trainer = PPOTrainer(models, self.layout, self.settings, schedule, score_fn=score_fn,
                                  rm_suffix=rm_suffix, rollout_rules=rollout_rules(config))
        self._held_out = None

    # The policy init's own SFT-stage config: where its world's held-out QA lives.
    def held_out(self):
        if self._held_out is None:
            from rlaif_jax.ppo.prompts import HeldOut
            from rlaif_jax.sft.stage import SyntheticSources

            sft_config = ml_collections.ConfigDict(self.loaded.policy_config)
            with sft_config.unlocked():
                sft_config.workdir = self.workdir
                sft_config.log.progress = False
            if not sft_config.eval.qa_files:
                raise ConfigError("ppo: the policy init's config names no held-out QA files")
            sources = SyntheticSources(sft_config)
            e = self.config.eval
            self._held_out = HeldOut(
                self.loaded.models.policy, sources, sft_config.eval.qa_files, self.tokenizer,
                e.batch_size, int(sft_config.data.max_length), e.max_new_tokens, e.num_qa,
                e.num_describe, self.mesh, self.rules)
        return self._held_out

    def fresh_state(self):
        from rlaif_jax.engine.state import state_from_variables
        return state_from_variables(self.layout, self.loaded.variables(),
                                    jax.random.PRNGKey(self.config.seed))

    def tree(self, state, frozen) -> dict:
        return optim.merge_trees(state.params, frozen)

    def evaluate(self, state, frozen) -> dict:
        variables = self.loaded.models.policy_variables(self.tree(state, frozen))
        metrics, _ = self.held_out()(variables)
        return metrics

    def finished(self) -> bool:
        from rlaif_jax.checkpoints.orbax_io import Checkpoints
        manager = Checkpoints(os.path.join(self.stage_dir, "checkpoints"), 1, 1, False)
        latest = manager.latest_step()
        manager.close()
        return latest is not None and latest >= int(self.config.num_iterations)

    def run(self) -> dict:
        from rlaif_jax.ppo.loop import PPOLoopOptions, run_ppo

        c = self.config
        primary = jax.process_index() == 0
        if primary:
            os.makedirs(self.stage_dir, exist_ok=True)
            with open(os.path.join(self.stage_dir, "config.json"), "w") as f:
                json.dump(json.loads(c.to_json_best_effort()), f, indent=2)
            m = self.loaded.models
            print(f"[{os.path.basename(self.stage_dir)}] reward={c.reward}; policy "
                  f"{self.loaded.policy_step}; RM {self.loaded.rm_step} (adapter: "
                  f"{m.rm_has_adapter}, critic shares the policy base: {m.critic_shares_base}); "
                  f"mesh {dict(self.mesh.shape)}; {c.num_iterations} iterations of "
                  f"{self.settings.rollout_batch_size} prompts from "
                  f"{self.prompts.pipeline.num_examples} (skipped: "
                  f"{dict(self.prompts.pipeline.skipped) or 'none'})", flush=True)
        options = PPOLoopOptions(
            num_iterations=int(c.num_iterations), checkpoint_every=c.checkpoint.every,
            keep_checkpoints=c.checkpoint.keep, async_checkpoints=c.checkpoint.async_save,
            eval_every=c.eval.every, sample_every=c.rollouts.sample_every,
            samples=c.rollouts.samples, eval_key=c.eval.key, tensorboard=c.log.tensorboard,
            progress=c.log.progress, seed=c.seed, name=os.path.basename(self.stage_dir))
        meta = {"init": self.loaded.policy_step, "rm_init": self.loaded.rm_step,
                "reward": c.reward, "seed": c.seed, "config": c.to_dict()}
        evaluate = self.evaluate if c.eval.every >= 0 else None
        return run_ppo(self.trainer, self.fresh_state, self.prompts, self.stage_dir, options,
                       evaluate, decode=lambda ids: self.tokenizer.decode(
                           [int(i) for i in ids], skip_special_tokens=True),
                       meta=json.loads(json.dumps(meta, default=str)))

    def final_state(self):
        """(state, frozen) at the run's last iteration."""
        from rlaif_jax.checkpoints.orbax_io import Checkpoints
        _, frozen = self.fresh_state()
        manager = Checkpoints(os.path.join(self.stage_dir, "checkpoints"), 1, 1, False)
        state, _ = manager.restore(manager.latest_step(), self.layout.abstract_state_sharded)
        manager.close()
        return state, frozen


def run_ppo_stage(config, mesh, loaded=None) -> PPORun:
    """One PPO run (reward from config.reward), resumed from its checkpoints (nothing is redone
    once it reached config.num_iterations). Returns the run (its models, loaded or not)."""
    run = PPORun(config, mesh, loaded)
    if run.finished():
        print(f"[{os.path.basename(run.stage_dir)}] done already (iteration "
              f"{config.num_iterations}): not redoing it", flush=True)
        return run
    results = run.run()
    if jax.process_index() == 0 and results:
        print(f"[{os.path.basename(run.stage_dir)}] done: " + json.dumps(
            {k: round(v, 4) for k, v in sorted(results.items())}), flush=True)
    return run


# ---------------------------------------------------------------------------------------------
# The main job


def run_ppo_main(config, mesh, run_stage_config) -> int:
    """The main job: the missing earlier stages, PPO, the controls, then the held-out table."""
    if config.reward not in REWARDS:  # before hours of earlier stages
        raise ConfigError(f"reward={config.reward!r}: expected one of {sorted(REWARDS)}")
    if config.run_missing_stages:
        run_missing_stages(config, run_stage_config)
    run = run_ppo_stage(config, mesh)
    if not config.eval.controls:
        return 0
    if config.reward == "rm":
        oracle = ml_collections.ConfigDict(config.to_dict())
        oracle.reward = "truth"
        print("[main] control: PPO on the true reward (the world's scorer) -> "
              f"{os.path.join(os.path.abspath(config.workdir), REWARDS['truth'])}", flush=True)
        run_ppo_stage(oracle, mesh, run.loaded)
    from rlaif_jax.main_job import held_out_table
    held_out_table(config, mesh, run)
    return 0
