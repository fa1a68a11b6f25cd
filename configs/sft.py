"""Stage 1 (SFT with a short-then-long curriculum) and stage 4 (policy init) of docs/method.md.

Presets (`--config=configs/sft.py:NAME`):
  tiny       the default: the synthetic video world (generated on first use under the workdir),
             a tiny video LLM trained from scratch on a tower pre-trained on world videos; its
             last phase also reads the feedback stage's `named_clip` contexts.
  smoke      the same, small enough to finish in under a minute (tests).
  judge_skills_tiny  tiny with the judge's skills mixed into the curriculum: clip answers (a
             clip as the input) and answers read from a context of clip answers, some wrong
             (docs/feedback_and_rm.md: measured, and not the default).
  reverse    a text-only LLaMA on a reverse-the-string task: the engine alone, in seconds.
  vicuna7b   docs/method.md stage 1: from LLaVA-1.5-7B (set --config.init), CLIP frozen, LoRA r 32
             alpha 32 and the projector trained, lr 1e-4, curriculum short then long.
  vicuna13b  the same at 13B (backbone of the reward and value models).
  policy_init_7b  stage 4: from sft-7b, LoRA r 64 alpha 16, lr 1e-4 cosine, warmup 3%, batch
             128, clip 0.3, on the held-out instruction set.
"""

import ml_collections

from configs import common as common_lib
from configs import models


def _base() -> ml_collections.ConfigDict:
    c = common_lib.common("sft")
    c.model_kind = "video_llm"  # 'video_llm' or 'llama' (text only)
    c.model = _video_tiny()
    # From a checkpoint holding a LoRA adapter: 'merge' folds it into the base and trains a new
    # adapter; 'continue' keeps training it (same rank).
    c.init_adapter = "merge"
    c.num_steps = 300
    c.batch_size = 32  # global rows a step
    c.accum_steps = 1  # micro-batches a step (token-weighted: exact)
    c.optim = common_lib.adamw(3e-3, "cosine", 1.0, warmup_steps=-1, warmup_ratio=0.05)
    # Trainable leaves: paths 'collection/module/.../leaf' that fullmatch `trainable` and not
    # `frozen`. Frozen leaves get no gradient, no optimizer state and are not checkpointed.
    c.trainable = "params/.*"
    c.frozen = ""
    c.data = ml_collections.ConfigDict(dict(
        # 'synthetic' (the bundled video world), 'build' (a build of your own JSON: build_dir,
        # tokenizer) or 'reverse' (a text-only task for the engine)
        source="synthetic",
        world="",  # '' = WORKDIR/data/world, generated on first use with world_args
        world_args=ml_collections.ConfigDict(dict(num_train=512, num_eval=64, frames=8, size=64,
                                                  seed=0)),
        train_build="sft",  # WORKDIR/data/<train_build>: the instruction build of train_files
        train_files=(("short", "sft_short.json"), ("long", "sft_long.json")),
        # (phase, share of num_steps), in order; a phase "a+b" takes its steps from a, b, a, ...
        curriculum=(("short", 0.4), ("long", 0.6)),
        max_length=96,  # tokens a row (the video's tokens come on top)
        split_max_length=(("short", 52),),  # (split, max_length) where a split needs fewer
        build_dir="", tokenizer="",  # source='build'
        reverse_length=4, reverse_symbols=8))
    # From-scratch video models only (no `init`, source 'synthetic'): pre-train the tiny vision
    # tower on newly drawn world videos first, our stand-in for CLIP's pre-training
    # (rlaif_jax/sft/vision_pretrain.py); cached under WORKDIR/data/vision_tower. 0: off.
    c.vision_pretrain = ml_collections.ConfigDict(dict(steps=0, batch_size=32, lr=3e-3))
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=64,
        # Held-out questions (world files -> splits of WORKDIR/data/eval): short answers ('qa')
        # graded right/wrong, descriptions ('generic') graded per axis.
        qa_files=(("qa", "eval_qa.json"), ("generic", "eval_generic.json")),
        num_qa=0, num_describe=0,  # 0: all
        max_new_tokens=80, blind=True, show=4,
        num_examples=256))  # source='reverse'
    return c


def _video_tiny() -> ml_collections.ConfigDict:
    # No pretrained CLIP exists for the synthetic world: `tiny` pre-trains the tower first
    # (vision_pretrain), then keeps it fixed as LLaVA keeps CLIP. The gradient stops at the
    # tower's output; its weights stay in the trainable tree (zero gradient, no weight decay)
    # so that every later stage finds them in the SFT checkpoint.
    model = models.get_config("video_tiny")
    model.freeze_vision = True
    return model


def reverse() -> ml_collections.ConfigDict:
    c = _base()
    c.model_kind = "llama"
    c.model = models.get_config("tiny")
    c.model.update(dict(vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, max_position_embeddings=64))
    c.data.source = "reverse"
    c.num_steps = 200
    c.batch_size = 32
    c.optim.lr = 3e-3
    c.checkpoint.every = 50
    c.log.every = 10
    c.eval.num_examples = 128
    return c


def tiny() -> ml_collections.ConfigDict:
    c = _base()
    # Norms, biases and LoRA's rank axes of a width-128 model are a large share of its bytes;
    # the 2% replication check is for the real sizes.
    c.max_replicated_share = 1.0
    c.vision_pretrain.steps = 1200
    # lr 3e-3 (the engine's default) let the from-scratch LLM learn to read the count from the
    # video and then stop there: colour answers stayed independent of the video, even for
    # one-shape videos whose colour a linear read-out of the tower gets 85% right. Trained on
    # colour questions alone it learnt them; beside the count it did so only at lr <= 1e-3
    # (docs/log/training.md, "Fourth session").
    c.optim.lr = 5e-4
    # 800: with the world's one-token template (2026-12-04) 600 steps reached held-out exact
    # match 0.456, 800 steps 0.485 (548 questions, SE 0.021); its rows are a third shorter.
    c.num_steps = 800
    # Both kinds of answer at the end: ending on `long` left the model describing the video
    # whatever the question (held-out exact match 0.22, 397 of 612 answers a description);
    # ending on `short` lost the descriptions (docs/log/training.md).
    # The last phase also teaches the judge to read the feedback stage's `named_clip` context
    # (the clip a question's time phrase names, its answer wrong in 35% of the rows): the
    # SFT videos' truth only.
    c.data.train_files = tuple(c.data.train_files) + (("named_context",
                                                       "sft_named_context.json"),)
    c.data.curriculum = (("short", 0.3), ("long", 0.3), ("short+long+named_context", 0.4))
    # The world's tokenizer writes the template's system sentence as one token (28 fewer a row):
    # rows are padded to these lengths, which keep the same rows as 96 / 52 did before.
    c.data.max_length = 68
    c.data.split_max_length = (("short", 24), ("named_context", 40))
    return c


def smoke() -> ml_collections.ConfigDict:
    """tiny on a small world, for tests: under a minute on 2 CPU cores."""
    c = tiny()
    c.data.world_args.update(dict(num_train=96, num_eval=8))
    c.eval.update(dict(batch_size=48, num_qa=40, num_describe=8, max_new_tokens=48))
    c.num_steps = 60
    c.optim.lr = 3e-3  # 60 steps: the plumbing, not the learning (tiny's 5e-4 is for 800)
    c.checkpoint.every = 60
    c.data.curriculum = (("short", 0.7), ("long", 0.3))
    c.vision_pretrain.update(dict(steps=40, batch_size=16))
    return c


def judge_skills_tiny() -> ml_collections.ConfigDict:
    """tiny, plus what the judge with the `question` context needs: answering a question about
    one clip (`prompts.clip_question`) and reading the clip answers in front of a question
    (`prompts.question_with_context`, a share of the answers wrong). Not the default: on world
    seed 0 the judge given this model's own clip answers agreed with the truth less often than
    without them (docs/feedback_and_rm.md)."""
    c = tiny()
    c.data.train_files = tuple(c.data.train_files) + (("clip", "sft_clip.json"),
                                                      ("context", "sft_context.json"))
    c.data.curriculum = (("short+clip", 0.25), ("long", 0.15),
                         ("short+long+context+clip+context+context", 0.6))
    c.data.split_max_length = (("short", 24), ("clip", 56), ("context", 52))
    return c


def _policy_init(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Stage 4 on top of a stage-1 preset: from the SFT stage directory of the same workdir, a
    new LoRA adapter (r 64, alpha 16, all seven projections) on the held-out instruction set."""
    c.stage = "policy_init"
    c.init = "stage:sft"
    llm = c.model.llm if "llm" in c.model else c.model
    llm.lora.rank = 64
    llm.lora.alpha = 16.0
    c.trainable = "lora/.*"
    c.data.train_build = "policy_init"
    c.data.train_files = (("train", "policy_init.json"),)
    c.data.curriculum = (("train", 1.0),)
    return c


def policy_init_tiny() -> ml_collections.ConfigDict:
    c = _policy_init(tiny())
    # 100 steps left held-out exact match where SFT had it (0.474 both, 2026-12-04); 40 for the
    # main job's time budget. Its table grades the model, so the stage does not
    # (--config.log.eval_every=0 does).
    c.num_steps = 40
    c.log.eval_every = -1
    c.optim.update(dict(lr=1e-3, warmup_ratio=0.03, schedule="cosine", grad_clip=0.3))
    return c


def policy_init_smoke() -> ml_collections.ConfigDict:
    c = _policy_init(smoke())
    c.num_steps = 10
    c.checkpoint.every = 10
    c.optim.update(dict(lr=1e-3, warmup_ratio=0.03, schedule="cosine", grad_clip=0.3))
    return c


def _vicuna(size: str) -> ml_collections.ConfigDict:
    c = _base()
    c.model = models.get_config(size)
    c.model.llm.lora.rank = 32
    c.model.llm.lora.alpha = 32.0
    c.init = ""  # required: the LLaVA-1.5 HF directory
    c.trainable = "lora/.*|params/projector/.*"
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.num_steps = 5000
    c.batch_size = 128
    c.accum_steps = 8
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.03, schedule="cosine", grad_clip=1.0))
    c.data.max_length = 2048
    c.data.world_args.update(dict(frames=50, size=336))
    c.checkpoint.every = 500
    c.log.every = 10
    return c


def vicuna7b() -> ml_collections.ConfigDict:
    return _vicuna("video_llava_7b")


def vicuna13b() -> ml_collections.ConfigDict:
    c = _vicuna("video_llava_7b")
    c.model.llm = models.get_config("vicuna13b")
    c.model.llm.lora.rank = 32
    c.model.llm.lora.alpha = 32.0
    return c


def policy_init_7b() -> ml_collections.ConfigDict:
    c = _policy_init(_vicuna("video_llava_7b"))
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.03, schedule="cosine", grad_clip=0.3))
    return c


PRESETS = {"tiny": tiny, "smoke": smoke, "judge_skills_tiny": judge_skills_tiny,
           "reverse": reverse, "vicuna7b": vicuna7b,
           "vicuna13b": vicuna13b, "policy_init_tiny": policy_init_tiny,
           "policy_init_smoke": policy_init_smoke, "policy_init_7b": policy_init_7b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in PRESETS:
        raise ValueError(f"unknown sft preset {arg!r}; choose from {sorted(PRESETS)}")
    return common_lib.lock(PRESETS[arg]())
