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
    if template == "none":  # base language models: the question as it is (video first)
        return f"{IMAGE_TOKEN}\n{question}" if with_video else question
    raise ValueError(f"template={template!r}: expected one of {list(TEMPLATES)}")


def tokenize_prompt(text: str, tokenizer, image_token_id: Optional[int] = None) -> list[int]:
    """BOS, then the text's tokens (no EOS: the model continues it).

    The text is split at `<image>` and each piece tokenised on its own (as LLaVA does), so the
    placeholder is exactly one id, `image_token_id`, whatever the tokenizer.
    """
    bos = tokenizer.bos_token_id
    ids = [bos] if bos is not None else []
    for index, piece in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            if image_token_id is None:
                raise ValueError("the prompt has <image> but the model takes no video")
            ids.append(image_token_id)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


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


def _make_batch(chunk, config, pad: int, vision: bool, model, skipped, answers):
    """Static-shape batch for `chunk`: videos decoded now (an unreadable one is skipped and
    counted), a short batch filled with copies of its last prompt. Returns (batch, kept chunk)."""
    frames = []
    if vision:
        from rlaif_jax.data import video as video_io  # the data layer's decoder (issue 4)

        size = model.config.vision.image_size
        kept = []
        for entry in chunk:
            index, _, source = entry
            if source is None:
                frames.append(np.zeros((config.num_frames, size, size, 3), np.uint8))
                kept.append(entry)
                continue
            try:
                frames.append(video_io.load_frames(source, config.num_frames, size,
                                                   config.video_root))
                kept.append(entry)
            except (video_io.VideoDecodeError, OSError) as error:
                reason = f"video_{getattr(error, 'reason', 'unreadable')}"
                answers[index]["error"] = reason
                skipped[reason] += 1
                logging.warning("generate: skipping %r: %s", answers[index]["id"], error)
        chunk = kept
    if not chunk:
        return None, chunk
    rows = [ids for _, ids, _ in chunk]
    fill = config.batch_size - len(rows)
    rows += [rows[-1]] * fill
    input_ids, attention_mask = _left_pad(rows, pad)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if vision:
        batch["frames"] = np.stack(frames + [frames[-1]] * fill)
        has_video = [source is not None for _, _, source in chunk]
        batch["has_video"] = np.asarray(has_video + [has_video[-1]] * fill)
    return batch, chunk


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

    vision = getattr(decoder, "has_vision", False)
    image_id = model.config.image_token_id if vision else None
    answers: list[dict] = []
    skipped: collections.Counter = collections.Counter()
    pending: list[tuple[int, list[int], Any]] = []  # (index into answers, prompt ids, video)
    for item in items:
        record = {"id": item.get("id") if isinstance(item, dict) else None,
                  "question": item.get("question") if isinstance(item, dict) else None,
                  "answer": None}
        answers.append(record)
        video = item.get("video") if isinstance(item, dict) else None
        reason = None
        if not isinstance(record["question"], str) or not record["question"].strip():
            reason = "no_question"
        elif video is not None and not vision:
            reason = "video_but_model_has_no_vision"
        else:
            text = render_prompt(record["question"], config.template, video is not None)
            ids = tokenize_prompt(text, tokenizer, image_id)
            text_ids = [i for i in ids if i != image_id]
            if len(ids) > config.max_prompt_length:
                reason = "prompt_too_long"
            elif max(text_ids) >= llm.vocab_size:
                reason = "token_outside_model_vocabulary"
        if reason:
            record["error"] = reason
            skipped[reason] += 1
        else:
            pending.append((len(answers) - 1, ids, video))

    key = jax.random.PRNGKey(config.seed)
    with tqdm.tqdm(total=len(items), desc="generate", unit="question") as bar:
        bar.update(len(items) - len(pending))  # skipped items are done
        for start in range(0, len(pending), config.batch_size):
            chunk = pending[start:start + config.batch_size]
            batch, chunk_kept = _make_batch(chunk, config, pad, vision, model, skipped, answers)
            if not chunk_kept:
                bar.update(len(chunk))
                continue
            out = generate(decoder, variables, batch, jax.random.fold_in(key, start), sampling,
                           mesh=mesh, rules=rules)
            tokens, lengths, has_eos = (su.to_host(out.tokens), su.to_host(out.lengths),
                                        su.to_host(out.has_eos))
            for row, (index, _, _) in enumerate(chunk_kept):
                answers[index]["answer"] = _answer_text(tokens[row], int(lengths[row]),
                                                        bool(has_eos[row]), tokenizer)
            bar.update(len(chunk))

    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    with open(config.output, "w") as f:
        json.dump(answers, f, indent=2, ensure_ascii=False)
    answered = sum(a["answer"] is not None for a in answers)
    summary = {"answered": answered, "skipped": dict(skipped), "output": config.output}
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
