"""Stage 3: the reward model (rlaif_jax/rm/stage.py).

    python launch/main.py --config=configs/rm.py[:PRESET] [--config.labels=truth]

The RM is the SFT model (config.init, default WORKDIR/sft; its architecture is read from the
checkpoint) with a scalar reward head, trained with Bradley-Terry + 1e-3 |mean(r1 + r2)| on the
feedback stage's preferences (WORKDIR/feedback/preferences.json). `labels='truth'` is the oracle
control (the same pairs, labelled by the synthetic world's scorer); it writes WORKDIR/rm_oracle.
Held-out pairwise accuracy against the AI labels and the truth every `log.eval_every` steps.

Presets:
  tiny       the default: full fine-tuning of the tiny video LLM's LLM + head (vision frozen),
             with the likelihood term (likelihood_weight 1).
  smoke      tiny, a few steps (tests).
  vicuna13b  docs/method.md: LoRA r 64, alpha 16 on the seven projections, vision and projector frozen,
             lr 2e-5 constant after 3% warmup, 16 pairs a batch, 1 epoch, clip 0.3, max len 2048.
"""

import ml_collections

from configs import common as common_lib

LORA_TARGETS = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _base() -> ml_collections.ConfigDict:
    c = common_lib.common("rm")
    c.init = ""  # the backbone: '' = WORKDIR/sft (a stage or step directory)
    # The architecture comes from the init checkpoint; model_kind/model are used only when
    # init_model_from_checkpoint is False (a random backbone, e.g. in tests).
    c.init_model_from_checkpoint = True
    c.model_kind = "video_llm"
    c.model = ml_collections.ConfigDict()
    c.world_dir = ""  # '' = WORKDIR/data/world
    c.preferences = ""  # '' = WORKDIR/feedback/preferences.json (the reference format)
    c.video_root = ""  # '' = the world
    c.tokenizer = ""  # '' = WORLD/tokenizer
    # 'ai': the judge's (WORKDIR/rm); 'ai_no_context': the judge's without context (the context
    # ablation, WORKDIR/rm_no_context); 'truth': the scorer's (the oracle control, rm_oracle)
    c.labels = "ai"
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=LORA_TARGETS))  # 0: full
    c.trainable = "params/(llm|reward_head)/.*"
    c.frozen = ""
    c.max_length = 256  # tokens a candidate (question + response + evaluation prompt)
    c.batch_size = 16  # pairs a step
    c.accum_steps = 1
    c.num_steps = -1  # -1: epochs over the training pairs
    c.epochs = 1.0
    c.center_coef = 1e-3
    # > 0: the score adds this times the response's mean log-probability per token under the RM's
    # own LM (rm/model.py); 0 is the paper's scalar head alone.
    c.likelihood_weight = 0.0
    c.optim = common_lib.adamw(2e-5, "constant", 0.3, warmup_steps=-1, warmup_ratio=0.03)
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=16, heldout_fraction=0.2, heldout_max=500))  # docs/method.md: 500 held-out pairs
    c.log.eval_every = 20
    return c


def tiny() -> ml_collections.ConfigDict:
    c = _base()
    c.max_replicated_share = 1.0  # a width-128 model: norms and biases are a large share
    # Held-out accuracy reached its level by step 20 of 72 (6 epochs of 191 pairs) in the
    # default run of 2026-12-04: 3 epochs.
    c.epochs = 3.0
    # Rows are padded to max_length: with the world's one-token evaluation prompt a candidate is
    # its question, its answer (at most 64 tokens from the feedback stage) and 25 more tokens.
    c.max_length = 96
    # The head alone did not learn the truth from a few hundred pairs, even from true labels
    # (0.51 on held-out pairs): the RM starts as the SFT model's likelihood judge instead, and
    # a lower learning rate keeps what it knows (docs/feedback_and_rm.md).
    c.likelihood_weight = 1.0
    c.optim.update(dict(lr=1e-4, schedule="cosine", warmup_ratio=0.05, grad_clip=1.0))
    # With the likelihood term training pairs matter less than a held-out set large enough to
    # tell 0.55 from 0.62 (n >= 200: SE 0.034).
    c.eval.heldout_fraction = 0.45
    c.checkpoint.every = 200
    return c


def smoke() -> ml_collections.ConfigDict:
    c = tiny()
    c.num_steps = 6
    c.batch_size = 8
    c.eval.batch_size = 8
    c.log.eval_every = 3
    c.checkpoint.every = 6
    return c


def vicuna13b() -> ml_collections.ConfigDict:
    c = _base()
    c.lora.update(dict(rank=64, alpha=16.0))
    c.trainable = "lora/.*|params/reward_head/.*"
    c.max_length = 2048
    c.batch_size = 16
    c.accum_steps = 4
    c.epochs = 1.0
    c.optim.update(dict(lr=2e-5, warmup_ratio=0.03, schedule="constant", grad_clip=0.3))
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint.every = 200
    c.log.eval_every = 100
    return c


PRESETS = {"tiny": tiny, "smoke": smoke, "vicuna13b": vicuna13b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in PRESETS:
        raise ValueError(f"unknown rm preset {arg!r}; choose from {sorted(PRESETS)}")
    return common_lib.lock(PRESETS[arg]())
