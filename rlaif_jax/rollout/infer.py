"""Inference for users: QUESTIONS.json in, ANSWERS.json out, with any `from_pretrained` model.

`run_generate(config)` is the `generate` stage (configs/generate.py): it loads the model and its
tokenizer, renders each question with the chat template, decodes the prompts in batches with the
KV-cache sampler on a mesh over all devices, and writes the answers in the input's order.
Bad items (no question, a video for a model without vision, an over-long prompt) are skipped,
counted and reported; a bad config or a missing checkpoint stops at start.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import rlaif_jax
from rlaif_jax.rollout import sharding_utils as su
from rlaif_jax.rollout.generate import SamplingConfig, decoder_for, generate

# ---------------------------------------------------------------------------------------------
# Chat templates. TEMPORARY copy of vicuna_v1: `rlaif_jax/data/prompts.py` (issue 4) owns the
# template text; when it lands, `render_prompt` should call its conversation builder instead.

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
TEMPLATES = ("vicuna_v1", "none")


def vicuna_v1_prompt(question: str, with_video: bool) -> str:
    """`SYSTEM USER: <image>\\n{question} ASSISTANT:` (the answer follows after a space)."""
    user = f"{IMAGE_TOKEN}\n{question}" if with_video else question
    return f"{VICUNA_V1_SYSTEM} USER: {user} ASSISTANT:"


def render_prompt(question: str, template: str, with_video: bool) -> str:
    if template == "vicuna_v1":
        return vicuna_v1_prompt(question, with_video)
    if template == "none":
        return question
    raise ValueError(f"template={template!r}: expected one of {list(TEMPLATES)}")


def tokenize_prompt(text: str, tokenizer) -> list[int]:
    """BOS, then the text's tokens (no EOS: the model continues it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


# ---------------------------------------------------------------------------------------------
# Config checks (before anything is loaded)


def check_config(config) -> SamplingConfig:
    for key in ("init", "input", "output"):
        if not config.get(key):
            raise ValueError(f"config.{key} is required")
    if not os.path.exists(config.init):
        raise FileNotFoundError(f"config.init: {config.init} does not exist")
    if not os.path.isfile(config.input):
        raise FileNotFoundError(f"config.input: {config.input} is not a file")
    if config.template not in TEMPLATES:
        raise ValueError(f"config.template={config.template!r}: expected one of {list(TEMPLATES)}")
    if config.batch_size < 1:
        raise ValueError(f"config.batch_size={config.batch_size}: must be >= 1")
    s = config.sampling
    known = {"temperature", "top_k", "top_p", "max_new_tokens", "prompt_bucket"}
    unknown = sorted(set(s.keys()) - known)
    if unknown:
        raise ValueError(f"unknown config.sampling keys {unknown}; known: {sorted(known)}")
    return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=float(s.temperature),
                          top_k=s.top_k, top_p=float(s.top_p), prompt_bucket=s.prompt_bucket)


def read_questions(path: str) -> list:
    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, video, question}} objects")
    return items


# ---------------------------------------------------------------------------------------------
# The run


def _left_pad(rows: list[list[int]], pad_id: int):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def _answer_text(tokens: np.ndarray, length: int, has_eos: bool, tokenizer) -> str:
    keep = tokens[: length - 1] if has_eos else tokens[:length]
    return tokenizer.decode(keep.tolist(), skip_special_tokens=True).strip()


def run_generate(config, tokenizer: Optional[Any] = None) -> dict:
    """Answers config.input's questions into config.output; returns counts (answered, skipped)."""
    import transformers  # heavy; only the generate stage needs it

    sampling = check_config(config)
    items = read_questions(config.input)
    overrides = {"dtype": config.dtype} if config.get("dtype") else {}
    model, params = rlaif_jax.from_pretrained(config.init, **overrides)
    decoder = decoder_for(model)
    if tokenizer is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer or config.init)
    llm = decoder.llm_config
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else llm.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else llm.pad_token_id
    sampling = sampling.replace(eos_token_id=eos, pad_token_id=pad)

    mesh = su.make_mesh(**config.mesh.to_dict())
    rules = su.GENERATION_RULES
    divisor = su.batch_divisor(mesh, rules)
    if config.batch_size % divisor:
        raise ValueError(f"config.batch_size={config.batch_size} is not a multiple of the mesh's "
                         f"{divisor} batch shards (config.mesh={config.mesh.to_dict()})")
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    variables = {"params": su.shard_params(params, boxed["params"], mesh, rules)}

    answers: list[dict] = []
    skipped: collections.Counter = collections.Counter()
    pending: list[tuple[int, list[int]]] = []  # (index into answers, prompt ids)
    for item in items:
        record = {"id": item.get("id") if isinstance(item, dict) else None,
                  "question": item.get("question") if isinstance(item, dict) else None,
                  "answer": None}
        answers.append(record)
        reason = None
        if not isinstance(record["question"], str) or not record["question"].strip():
            reason = "no_question"
        elif item.get("video") is not None and not getattr(decoder, "has_vision", False):
            reason = "video_but_model_has_no_vision"
        else:
            ids = tokenize_prompt(render_prompt(record["question"], config.template, False),
                                  tokenizer)
            if len(ids) > config.max_prompt_length:
                reason = "prompt_too_long"
            elif max(ids) >= llm.vocab_size:
                reason = "token_outside_model_vocabulary"
        if reason:
            record["error"] = reason
            skipped[reason] += 1
        else:
            pending.append((len(answers) - 1, ids))

    key = jax.random.PRNGKey(config.seed)
    with tqdm.tqdm(total=len(items), desc="generate", unit="question") as bar:
        bar.update(len(items) - len(pending))  # skipped items are done
        for start in range(0, len(pending), config.batch_size):
            chunk = pending[start:start + config.batch_size]
            rows = [ids for _, ids in chunk]
            # Static shapes: a short last batch is filled with copies of its last prompt.
            rows += [rows[-1]] * (config.batch_size - len(rows))
            input_ids, attention_mask = _left_pad(rows, pad)
            out = generate(decoder, variables,
                           {"input_ids": input_ids, "attention_mask": attention_mask},
                           jax.random.fold_in(key, start), sampling, mesh=mesh, rules=rules)
            tokens, lengths, has_eos = (su.to_host(out.tokens), su.to_host(out.lengths),
                                        su.to_host(out.has_eos))
            for row, (index, _) in enumerate(chunk):
                answers[index]["answer"] = _answer_text(tokens[row], int(lengths[row]),
                                                        bool(has_eos[row]), tokenizer)
            bar.update(len(chunk))

    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    with open(config.output, "w") as f:
        json.dump(answers, f, indent=2, ensure_ascii=False)
    summary = {"answered": len(pending), "skipped": dict(skipped), "output": config.output}
    logging.info("generate: %s", summary)
    if skipped:
        logging.warning("generate: skipped %d of %d questions: %s", sum(skipped.values()),
                        len(items), dict(skipped))
    return summary


def main(argv):
    del argv
    from absl import flags
    run_generate(flags.FLAGS.config)


if __name__ == "__main__":
    # Standalone until launch/main.py dispatches config.stage == "generate" here:
    #   python -m rlaif_jax.rollout.infer --config=configs/generate.py --config.init=PATH ...
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/generate.py", lock_config=True)
    flags.mark_flags_as_required(["config"])
    app.run(main)
