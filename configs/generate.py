"""Inference: answer a list of questions (about videos, or text only) with any loadable model.

    python launch/main.py --config=configs/generate.py --config.init=PATH \
        --config.input=QUESTIONS.json --config.output=ANSWERS.json [--config.sampling.temperature=0]

QUESTIONS.json: [{"id", "video" (a file, a frame folder or null), "question"}];
ANSWERS.json: [{"id", "question", "answer"}] in the same order (a skipped item has answer null
and an "error" naming why).
"""

import ml_collections


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "greedy"):
        raise ValueError(f"unknown generate preset {arg!r}; choose from ['default', 'greedy']")
    config = ml_collections.ConfigDict()
    config.stage = "generate"
    config.init = ""  # anything rlaif_jax.from_pretrained loads (required)
    config.tokenizer = ""  # a tokenizer directory; empty: `rlaif_jax.tokenizer_path(init)`
    config.input = ""  # QUESTIONS.json (required)
    config.output = ""  # ANSWERS.json (required)
    config.template = "vicuna_v1"  # chat template; "none" feeds the question as it is
    config.dtype = ""  # compute dtype override, e.g. "bfloat16"; empty: the checkpoint's
    config.batch_size = 8  # prompts decoded together (a multiple of the mesh's batch shards)
    config.max_prompt_length = 2048  # longer prompts are skipped and counted
    config.num_frames = 0  # frames sampled per video; 0: the model's own (50 for the 7B)
    config.video_root = ""  # relative video paths are resolved against this
    config.seed = 0
    config.sampling = ml_collections.ConfigDict(dict(
        temperature=0.0 if arg == "greedy" else 0.2,  # docs/method.md's evaluation setting; 0: greedy
        top_k=0,  # 0: off
        top_p=1.0,  # 1: off
        max_new_tokens=512,
        prompt_bucket=64,  # prompts left-padded to a multiple of this (fewer recompiles)
    ))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return config
