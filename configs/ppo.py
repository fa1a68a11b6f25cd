"""Stage 5, PPO from AI feedback, and the main job (`python launch/main.py --config=configs/ppo.py`).

Presets (`--config=configs/ppo.py:NAME`):
  tiny      the default: the synthetic world's tiny video LLM; every earlier stage runs first when
            its output is missing from the workdir. The policy, reference, RM and value model
            share one frozen base (the tiny world's SFT model).
  smoke     the same chain, small enough for CI.
  vicuna7b  docs/method.md's recipe for real meshes: 7B policy / reference, 13B RM / value backbone,
            LoRA r 64 alpha 16; 256 prompts an iteration left-padded to 128 tokens, up to 896
            new tokens at temperature 1; 2 epochs of minibatches of 128; lr 3e-5 cosine after 5
            warmup iterations, weight decay 0, one global clip of 1.0; KL coefficient 0.1 (k1).
"""

import os

import ml_collections

from configs import common as common_lib
from configs import feedback as feedback_configs
from configs import models
from configs import rm as rm_configs
from configs import sft as sft_configs


def _base() -> ml_collections.ConfigDict:
    c = common_lib.common("ppo")
    c.model_kind = "video_llm"
    # The policy's and the RM / value backbone's models. A run reads their architectures from
    # the checkpoints it starts from and takes only how to run them from here (dtype,
    # param_dtype, scan_layers, remat_policy: e.g. --config.model.llm.remat_policy=full);
    # benchmarks/memory_plan.py builds the whole job from them. Empty critic_model: the policy's.
    c.model = models.get_config("video_tiny")
    c.critic_model = ml_collections.ConfigDict(type_safe=False)
    c.critic_shares_base = True
    c.full_finetune = False
    # Where the models come from: stage directories of this workdir ('stage:NAME'), checkpoint
    # directories or HF directories.
    c.init = "stage:policy_init"  # policy (and reference) = this checkpoint
    c.rm_init = "stage:rm"
    c.run_missing_stages = True  # the main job: make what PPO needs first, saying so
    # The main job keeps compiled programs in WORKDIR/jax_cache (the chain compiles the same
    # steps several times); unless JAX_COMPILATION_CACHE_DIR names another place.
    c.compilation_cache = True
    # ...and the context ablation beside the RM: RMs on the same pairs labelled by the judge
    # without context (WORKDIR/rm_no_context) and by the truth (WORKDIR/rm_oracle)
    c.rm_controls = True
    c.chain_preset = ""  # the earlier stages' presets ('tiny' or 'smoke'); '' = from this one
    c.num_iterations = 40
    # 'rm' (RLAIF: WORKDIR/ppo) or 'truth' (the synthetic world's scorer: the true-reward
    # control, WORKDIR/ppo_oracle)
    c.reward = "rm"
    # The value model's adapter when the RM was trained without one (fully fine-tuned): fresh,
    # B zero, so the value model starts as exactly the RM's backbone.
    c.value_lora = ml_collections.ConfigDict(dict(
        rank=64, alpha=16.0, targets="(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    c.ppo = ml_collections.ConfigDict(dict(
        rollout_batch_size=256, rollout_micro_batch=32, minibatch_size=128, train_micro_batch=0,
        epochs=2, max_new_tokens=896, temperature=1.0, kl_coef=0.1, kl_estimator="k1",
        no_eos_penalty=-8.0, length_penalty=-10.0, reward_scale=10.0, gamma=1.0, lam=1.0,
        clip=0.2, value_clip=0.2, value_coef=0.1,
        reference_pads=False,  # True: the reference's pad behaviour, everywhere
        truncate_at_question_mark=False,  # True: the reference's "?" truncation quirk
        prompt_bucket=16, max_prompt_length=128))
    c.optim = common_lib.adamw(3e-5, "cosine", 1.0, warmup_iterations=5)
    # Sampling may use another weight layout than training: (logical_name, mesh_axes) overrides.
    c.rollout_rules = ()
    c.data = ml_collections.ConfigDict(dict(
        world="",  # '' = WORKDIR/data/world
        prompts_file="ppo_prompts.json"))
    c.eval = ml_collections.ConfigDict(dict(
        every=10,  # held-out QA every N iterations and at the end (-1: never during PPO)
        batch_size=64, max_new_tokens=64, num_qa=0, num_describe=0,  # 0: all
        key="eval/exact_match",  # the best checkpoint's metric
        controls=True))  # the main job's controls and table: PPO on the true reward, blind
    c.rollouts = ml_collections.ConfigDict(dict(sample_every=10, samples=8))
    c.checkpoint.update(dict(every=5, keep=2, async_save=False))
    return c


def tiny() -> ml_collections.ConfigDict:
    c = _base()
    c.max_replicated_share = 1.0  # a width-128 model: norms and biases are a large share
    # 12 iterations, for the main job's time budget: in the runs of 2026-12-04 the rollout
    # reward made most of its rise in the first 8 to 12 iterations (docs/ppo.md).
    c.num_iterations = 12
    # Up to 64 new tokens, as the feedback stage samples and the eval answers: at 48, 3% of the
    # first rollouts (long descriptions) ended without EOS and took the -8 penalty, which taught
    # the policy to stop early. The reference's length penalty is -10 * len / 896, about -1 for
    # its answers; here -0.2 over 64 tokens: at -1 over 48 the true-reward control learnt to cut
    # descriptions short (correctness 0.568 -> 0.355, detail 0.488 -> 0.254 in 20 iterations).
    c.ppo.update(dict(rollout_batch_size=64, rollout_micro_batch=32, minibatch_size=32,
                      max_new_tokens=64, max_prompt_length=96, length_penalty=-0.2))
    c.optim.update(dict(lr=1e-3, warmup_iterations=2))
    # Every held-out question (574 short, 64 descriptions on world seed 0), graded once, by the main job's table
    # (every=-1: not during PPO, whose last checkpoint is the row).
    c.eval.update(dict(every=-1, num_qa=0, num_describe=0, max_new_tokens=64))
    c.checkpoint.every = 10
    return c


def smoke() -> ml_collections.ConfigDict:
    c = tiny()
    c.chain_preset = "smoke"
    c.num_iterations = 4
    c.ppo.update(dict(rollout_batch_size=16, rollout_micro_batch=16, minibatch_size=16,
                      epochs=1, max_new_tokens=16))
    c.eval.update(dict(every=2, batch_size=16, num_qa=16, num_describe=4, max_new_tokens=24))
    c.rollouts.update(dict(sample_every=2, samples=4))
    c.checkpoint.every = 2
    return c


def vicuna7b() -> ml_collections.ConfigDict:
    c = _base()
    c.model = models.get_config("video_llava_7b")
    c.model.llm.lora.update(dict(rank=64, alpha=16.0))
    c.critic_model = models.get_config("video_llava_7b")
    c.critic_model.llm = models.get_config("vicuna13b")
    c.critic_model.llm.lora.update(dict(rank=64, alpha=16.0))
    c.critic_shares_base = False
    c.run_missing_stages = False  # real runs name their checkpoints
    c.init = ""  # required: the policy-init checkpoint (sft-7b + adapter)
    c.rm_init = ""  # required: the RM checkpoint (sft-13b + adapter + head)
    c.num_iterations = 200
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.ppo.update(dict(rollout_micro_batch=32, train_micro_batch=16, prompt_bucket=128))
    c.eval.update(dict(every=20, max_new_tokens=512))
    c.rollouts.sample_every = 10
    c.checkpoint.update(dict(every=10, keep=2, async_save=True))
    return c


PRESETS = {"tiny": tiny, "smoke": smoke, "vicuna7b": vicuna7b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in PRESETS:
        raise ValueError(f"unknown ppo preset {arg!r}; choose from {sorted(PRESETS)}")
    return common_lib.lock(PRESETS[arg]())


# The main job's earlier stages (rlaif_jax/main_job.py runs each one whose output is missing):
# stage -> (config module, preset) for each chain preset.
CHAIN = {
    preset: {"sft": (sft_configs, preset), "policy_init": (sft_configs, f"policy_init_{preset}"),
             "feedback": (feedback_configs, preset), "rm": (rm_configs, preset),
             "rm_no_context": (rm_configs, preset), "rm_oracle": (rm_configs, preset)}
    for preset in ("tiny", "smoke")}
# Overrides of those presets within the chain. The tiny and smoke SFT models judge near 50/50
# on many pairs, so feedback's confidence margin of 0.1 would leave the RM few pairs: the chain
# keeps every judged pair.
CHAIN_OVERRIDES = {("feedback", "smoke"): {"margin": 0.0}, ("feedback", "tiny"): {"margin": 0.0}}
# The context ablation (config.rm_controls): the same pairs, labelled by the judge without
# context, and by the truth (the oracle control).
for _preset in CHAIN:
    CHAIN_OVERRIDES[("rm_no_context", _preset)] = {"labels": "ai_no_context"}
    CHAIN_OVERRIDES[("rm_oracle", _preset)] = {"labels": "truth"}


def chain_preset(config: ml_collections.ConfigDict) -> str:
    """Which preset of the earlier stages matches a PPO config (tiny or smoke)."""
    return config.chain_preset or ("smoke" if int(config.num_iterations) <= 4 else "tiny")


def chain_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config of earlier stage `stage` for the main job of PPO config `config`: its preset,
    with the job's workdir, seed and logging."""
    preset = chain_preset(config)
    if preset not in CHAIN:
        raise ValueError(f"chain_preset={preset!r}: expected one of {sorted(CHAIN)}")
    module, name = CHAIN[preset][stage]
    stage_config = module.get_config(name)
    with stage_config.unlocked():
        stage_config.workdir = os.path.abspath(config.workdir)
        stage_config.seed = config.seed
        stage_config.log.progress = config.log.progress
        stage_config.log.tensorboard = config.log.tensorboard
        for key, value in CHAIN_OVERRIDES.get((stage, preset), {}).items():
            stage_config[key] = value
    return stage_config
