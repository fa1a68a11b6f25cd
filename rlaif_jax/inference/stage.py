"""Inference for users: QUESTIONS.json in, ANSWERS.json out, with any `from_pretrained` model.

`run(config)` is the `generate` stage (configs/generate.py): it loads the model and its
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
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm
import transformers
from absl import app, flags
from ml_collections import config_flags

from rlaif_jax.data import conversation, prompts
from rlaif_jax.data import video as video_io
from rlaif_jax.engine.pretrained import load_model, tokenizer_dir
from rlaif_jax.parallel import sharding as su
from rlaif_jax.parallel.mesh import ConfigError, make_mesh
from rlaif_jax.sampling.generate import SamplingConfig, decoder_for, generate
from rlaif_jax.workdir.files import atomic_write_json

# ---------------------------------------------------------------------------------------------
# Chat templates: the text lives in rlaif_jax/data/prompts.py, the rendering in conversation.py.

VICUNA_V1_SYSTEM = prompts.VICUNA_V1_SYSTEM
IMAGE_TOKEN = prompts.IMAGE_TOKEN
TEMPLATES = ("vicuna_v1", "none")


def vicuna_v1_prompt(question: str, with_video: bool) -> str:
    """`SYSTEM USER: <image>\\n{question} ASSISTANT:` (the answer follows after a space)."""
    turn = conversation.video_question(question) if with_video else {"from": "human",
                                                                     "value": question}
    return conversation.render([turn, {"from": "gpt", "value": None}])[0]


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


def check_config(config, need_files: bool = True) -> SamplingConfig:
    for key in ("init", "input", "output") if need_files else ("init",):
        if not config.get(key):
            raise ValueError(f"config.{key} is required")
    if not os.path.exists(config.init):
        raise FileNotFoundError(f"config.init: {config.init} does not exist")
    if need_files and not os.path.isfile(config.input):
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


def _make_batch(chunk, settings, pad: int, vision: bool, num_frames: int, image_size: int,
                skipped, answers):
    """Static-shape batch for `chunk`: videos decoded now (an unreadable one is skipped and
    counted), a short batch filled with copies of its last prompt. Returns (batch, kept chunk)."""
    frames = []
    if vision:
        kept = []
        for entry in chunk:
            index, _, source = entry
            if source is None:
                frames.append(np.zeros((num_frames, image_size, image_size, 3), np.uint8))
                kept.append(entry)
                continue
            try:
                frames.append(video_io.load_frames(source, num_frames, image_size,
                                                   settings.video_root))
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
    fill = settings.batch_size - len(rows)
    rows += [rows[-1]] * fill
    input_ids, attention_mask = conversation.left_pad(rows, pad)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if vision:
        batch["frames"] = np.stack(frames + [frames[-1]] * fill)
        has_video = [source is not None for _, _, source in chunk]
        batch["has_video"] = np.asarray(has_video + [has_video[-1]] * fill)
    return batch, chunk


def _answer_text(tokens: np.ndarray, length: int, has_eos: bool, tokenizer) -> str:
    keep = tokens[: length - 1] if has_eos else tokens[:length]
    return tokenizer.decode(keep.tolist(), skip_special_tokens=True).strip()


class QuestionAnswerer:
    """A loaded model, its tokenizer and a mesh, answering questions in batches.

    Shared by the `generate` stage (`run`) and the evaluation runners. `config` holds
    the fields of configs/generate.py that concern answering: init, tokenizer, dtype, template,
    batch_size, max_prompt_length, num_frames, video_root, seed, sampling, mesh.
    """

    def __init__(self, config, tokenizer: Optional[Any] = None):
        self.settings = config
        self.sampling = check_config(config, need_files=False)
        self.mesh = make_mesh(config.mesh.to_dict())
        self.rules = su.DEFAULT_RULES
        divisor = su.batch_divisor(self.mesh)
        if config.batch_size % divisor:
            raise ValueError(f"config.batch_size={config.batch_size} is not a multiple of the "
                             f"mesh's {divisor} batch shards (config.mesh={config.mesh.to_dict()})")
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                config.tokenizer or tokenizer_dir(config.init))
        self.tokenizer = tokenizer
        overrides = {"dtype": config.dtype} if config.get("dtype") else {}
        self.model, params = load_model(config.init, self.mesh, self.rules, tokenizer,
                                        **overrides)
        self.variables = {"params": params}
        model = self.model
        self.decoder = decoder_for(model)
        llm = self.llm_config = self.decoder.llm_config
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else llm.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else llm.pad_token_id
        self.pad = pad
        self.sampling = self.sampling.replace(eos_token_id=eos, pad_token_id=pad)
        self.has_vision = bool(getattr(self.decoder, "has_vision", False))
        self.image_id = model.config.image_token_id if self.has_vision else None
        self.image_size = model.config.vision.image_size if self.has_vision else 0
        # 0: the frame count the model was trained with (its config), not a fixed default.
        self.num_frames = (config.get("num_frames") or model.config.num_frames
                           if self.has_vision else 0)

    def _prompt_ids(self, question: Any, video: Any) -> tuple[Optional[list], Optional[str]]:
        """(prompt ids, None) or (None, why the question is skipped)."""
        if not isinstance(question, str) or not question.strip():
            return None, "no_question"
        if video is not None and not self.has_vision:
            return None, "video_but_model_has_no_vision"
        text = render_prompt(question, self.settings.template, video is not None)
        ids = tokenize_prompt(text, self.tokenizer, self.image_id)
        text_ids = [i for i in ids if i != self.image_id]
        if len(ids) > self.settings.max_prompt_length:
            return None, "prompt_too_long"
        if max(text_ids) >= self.llm_config.vocab_size:
            return None, "token_outside_model_vocabulary"
        return ids, None

    def answer(self, items: list, on_done: Optional[Callable[[list], None]] = None,
               desc: str = "generate") -> tuple[list, collections.Counter]:
        """Answers `items` ({"id", "video": a source or None, "question"}) in order.

        Returns (records {"id", "question", "answer"[, "error"]} in the items' order, counts of
        skipped items by reason). `on_done(records)` is called as records finish: first with
        the items skipped before decoding, then once per batch, so a caller can save progress.
        """
        answers: list[dict] = []
        skipped: collections.Counter = collections.Counter()
        pending: list[tuple[int, list[int], Any]] = []  # (index into answers, prompt ids, video)
        for item in items:
            record = {"id": item.get("id") if isinstance(item, dict) else None,
                      "question": item.get("question") if isinstance(item, dict) else None,
                      "answer": None}
            answers.append(record)
            video = item.get("video") if isinstance(item, dict) else None
            ids, reason = self._prompt_ids(record["question"], video)
            if reason:
                record["error"] = reason
                skipped[reason] += 1
            else:
                pending.append((len(answers) - 1, ids, video))
        if on_done is not None and len(pending) < len(answers):
            on_done([a for a in answers if "error" in a])

        key = jax.random.PRNGKey(self.settings.seed)
        batch_size = self.settings.batch_size
        with tqdm.tqdm(total=len(items), desc=desc, unit="question") as bar:
            bar.update(len(items) - len(pending))  # skipped items are done
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                batch, chunk_kept = _make_batch(chunk, self.settings, self.pad, self.has_vision,
                                                self.num_frames, self.image_size, skipped,
                                                answers)
                if chunk_kept:
                    out = generate(self.decoder, self.variables, batch,
                                   jax.random.fold_in(key, start), self.sampling,
                                   mesh=self.mesh, rules=self.rules)
                    tokens, lengths, has_eos = (np.asarray(out.tokens), np.asarray(out.lengths),
                                                np.asarray(out.has_eos))
                    for row, (index, _, _) in enumerate(chunk_kept):
                        answers[index]["answer"] = _answer_text(
                            tokens[row], int(lengths[row]), bool(has_eos[row]), self.tokenizer)
                if on_done is not None:
                    on_done([answers[index] for index, _, _ in chunk])
                bar.update(len(chunk))
        return answers, skipped


def run(config, mesh=None, tokenizer: Optional[Any] = None) -> dict:
    """Answers config.input's questions into config.output; returns counts (answered, skipped).
    The stage makes its own mesh from config.mesh (one process's devices), not `mesh`."""
    del mesh
    try:
        check_config(config)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None
    items = read_questions(config.input)
    answers, skipped = QuestionAnswerer(config, tokenizer).answer(items)
    atomic_write_json(config.output, answers)
    answered = sum(a["answer"] is not None for a in answers)
    summary = {"answered": answered, "skipped": dict(skipped), "output": config.output}
    print(f"[generate] {json.dumps(summary)}", flush=True)
    if skipped:
        logging.warning("generate: skipped %d of %d questions: %s", sum(skipped.values()),
                        len(items), dict(skipped))
    return summary


def main(argv):
    del argv
    print(json.dumps(run(flags.FLAGS.config)), flush=True)


if __name__ == "__main__":
    # Also run by launch/main.py (config.stage == "generate"); standalone:
    #   python -m rlaif_jax.inference.stage --config=configs/generate.py --config.init=PATH ...
    config_flags.DEFINE_config_file("config", None, "configs/generate.py", lock_config=True)
    flags.mark_flags_as_required(["config"])
    app.run(main)
