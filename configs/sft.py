"""Stage 1 (SFT with a short-then-long curriculum) and stage 4 (policy init) of SPEC.md.

Presets (`--config=configs/sft.py:NAME`):
  tiny       the default: the synthetic video world (generated on first use under the workdir),
             a tiny video LLM trained from scratch, vision tower trainable (no pretrained CLIP).
  smoke      the same, small enough to finish in under a minute (tests).
  reverse    a text-only LLaMA on a reverse-the-string task: the engine alone, in seconds.
  vicuna7b   SPEC.md stage 1: from LLaVA-1.5-7B (set --config.init), CLIP frozen, LoRA r 32
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
    c.model_kind = "llama"  # 'llama' (text) or 'video_llm'
    c.model = models.get_config("tiny")
    c.num_steps = 300
    c.batch_size = 32  # global rows a step
    c.accum_steps = 1  # micro-batches a step (token-weighted: exact)
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=-1, warmup_ratio=0.05, schedule="cosine", end_factor=0.0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
    # Trainable leaves: paths 'collection/module/.../leaf' that fullmatch `trainable` and not
    # `frozen`. Frozen leaves get no gradient, no optimizer state and are not checkpointed.
    c.trainable = "params/.*"
    c.frozen = ""
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",  # 'synthetic' (the bundled video world) or 'reverse' (text only)
        reverse_length=4, reverse_symbols=8))
    c.eval = ml_collections.ConfigDict(dict(num_examples=256, batch_size=64))
    return c


def reverse() -> ml_collections.ConfigDict:
    c = _base()
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
    c.model_kind = "video_llm"
    return c


def smoke() -> ml_collections.ConfigDict:
    c = tiny()
    c.num_steps = 60
    c.checkpoint.every = 30
    return c


def _vicuna(size: str) -> ml_collections.ConfigDict:
    c = _base()
    c.model_kind = "video_llm"
    c.model = models.get_config(size)
    c.model.lora.rank = 32
    c.model.lora.alpha = 32.0
    c.init = ""  # required: the LLaVA-1.5 HF directory
    c.trainable = "lora/.*|params/projector/.*"
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.num_steps = 5000
    c.batch_size = 128
    c.accum_steps = 8
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.03, schedule="cosine", grad_clip=1.0))
    c.checkpoint.every = 500
    c.log.every = 10
    return c


def vicuna7b() -> ml_collections.ConfigDict:
    return _vicuna("vicuna7b")


def vicuna13b() -> ml_collections.ConfigDict:
    return _vicuna("vicuna13b")


def policy_init_7b() -> ml_collections.ConfigDict:
    c = _vicuna("vicuna7b")
    c.stage = "policy_init"
    c.model.lora.rank = 64
    c.model.lora.alpha = 16.0
    c.trainable = "lora/.*"
    c.optim.update(dict(lr=1e-4, warmup_ratio=0.03, schedule="cosine", grad_clip=0.3))
    return c


PRESETS = {"tiny": tiny, "smoke": smoke, "reverse": reverse, "vicuna7b": vicuna7b,
           "vicuna13b": vicuna13b, "policy_init_7b": policy_init_7b}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    arg = arg or "tiny"
    if arg not in PRESETS:
        raise ValueError(f"unknown sft preset {arg!r}; choose from {sorted(PRESETS)}")
    return common_lib.lock(PRESETS[arg]())
