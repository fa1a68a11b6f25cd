"""Evaluation: zero-shot video QA and the Video-ChatGPT benchmark, judged, as a table.

    python launch/main.py --config=configs/eval.py --config.init=PATH

Presets (`--config=configs/eval.py:NAME`):
  default       the synthetic world (config.world, else WORKDIR/data/world): its eval files and
                videos, the world's frame count, graded by the world's scorer (exact truth).
  videochatgpt  docs/method.md's setting on the real sets: set config.tasks.<task>=FILE and
                config.video_root; 50 frames, temperature 0.2, 512 new tokens, judged by an
                OpenAI-compatible endpoint (config.judge.base_url, config.judge.model, the key
                in the environment variable config.judge.api_key_env).
  local_judge   the synthetic world graded by one of our own models (config.judge.init).

Outputs under config.output_dir (default WORKDIR/eval/<name>): <task>/answers.jsonl,
<task>/predictions.json (the reference's format), <task>/judgements.jsonl, results.json,
results.md. Rerunning the same command resumes: finished answers and judgements are not redone.
"""

import ml_collections

from configs import common as common_lib

PRESETS = ("default", "videochatgpt", "local_judge")


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown eval preset {arg!r}; choose from {list(PRESETS)}")
    c = common_lib.common("eval")
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # inference: rows only
    c.name = ""  # the row's name in the table; empty: the init directory's name
    c.output_dir = ""  # empty: WORKDIR/eval/<name>
    c.tokenizer = ""  # empty: the one saved with init (a stage directory: its stage's)
    c.dtype = ""  # compute dtype override, e.g. "bfloat16"
    c.template = "vicuna_v1"
    c.batch_size = 8  # prompts decoded together (a multiple of the mesh's batch shards)
    c.max_prompt_length = 2048
    c.world = ""  # a synthetic world directory; empty: WORKDIR/data/world when it exists
    c.video_root = ""  # where video_name is looked up (files or frame folders); empty: world's
    c.num_frames = 0 if arg != "videochatgpt" else 50  # 0: the synthetic world's frame count
    c.blind = False  # True: questions without their videos (the blind control; text models)
    c.max_items = 0  # per task; 0: all
    # {task: JSON file}; all empty: the world's eval files (synthetic_qa and the benchmark).
    c.tasks = ml_collections.ConfigDict(dict(
        msvd_qa="", msrvtt_qa="", activitynet_qa="", synthetic_qa="",
        generic="", temporal="", consistency=""))
    c.sampling = ml_collections.ConfigDict(dict(
        temperature=0.2, top_k=0, top_p=1.0, max_new_tokens=512, prompt_bucket=64))
    c.judge = ml_collections.ConfigDict(dict(
        kind={"default": "synthetic", "videochatgpt": "http", "local_judge": "model"}[arg],
        world="",  # synthetic: empty = config.world
        # http: any OpenAI-compatible chat-completions endpoint
        base_url="https://api.openai.com/v1", model="gpt-3.5-turbo",
        api_key_env="OPENAI_API_KEY",  # the NAME of the variable holding the key
        concurrency=8, timeout_s=60.0, max_retries=6, backoff_s=1.0, max_backoff_s=60.0,
        parse_retries=2, temperature=0.0, max_tokens=64,
        # model: one of our own models as the judge (its next-token probabilities)
        init="", tokenizer="", batch_size=8,
    ))
    return common_lib.lock(c)
