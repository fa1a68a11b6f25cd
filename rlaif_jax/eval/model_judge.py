"""One of our own models as the evaluation judge, read from its next-token probabilities.

The judge model gets the same (system, user) judge prompt as the HTTP judge, in the vicuna_v1
template, and its reply is started for it (`prompts.reply_prefix`): `{'score': ` for a
benchmark axis, `{'pred': '` then `{'pred': 'yes', 'score': ` for QA. The value is read from
the distribution of the next token, restricted to the candidates and renormalised:

- verdict: 'yes' when p(yes) >= p(no);
- score: the expected value sum_k k * p(k) over k = 0..5 (smoother than the argmax, which a
  small judge would round to the same digit for most answers).

So a local judge never produces an unreadable reply. Candidate tokens are found by tokenising
prefix + candidate and taking the first token past the part shared with the other candidates;
a tokenizer that cannot tell the candidates apart that way fails at start with a clear message.
The prompt is text only (as the reference's GPT judge): the judge does not see the video.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from rlaif_jax.data import prompts
from rlaif_jax.data.prompts import QA_AXIS, SCORE_MAX, judge_messages, reply_prefix
from rlaif_jax.engine.pretrained import load_model, tokenizer_dir
from rlaif_jax.eval.judging import Judgement, JudgeTask
from rlaif_jax.sampling.generate import bucket_length, decoder_for

VERDICTS = ("yes", "no")
SCORES = tuple(str(k) for k in range(SCORE_MAX + 1))


def judge_text(task: JudgeTask, prefix: str) -> str:
    system, user = (m["content"] for m in judge_messages(
        task.axis, task.question, task.answer, task.prediction, task.question_2,
        task.prediction_2))
    return (f"{prompts.VICUNA_V1_SYSTEM} {prompts.USER_ROLE}: {system}\n{user} "
            f"{prompts.ASSISTANT_ROLE}: {prefix}")


def _ids(tokenizer, text: str) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def candidate_split(tokenizer, text: str, candidates) -> tuple[list[int], list[int]]:
    """(prompt ids, one token id per candidate): the prompt is what all candidates share."""
    rows = [_ids(tokenizer, text + c) for c in candidates]
    shared = 0
    while all(len(r) > shared for r in rows) and len({r[shared] for r in rows}) == 1:
        shared += 1
    if any(len(r) <= shared for r in rows):
        raise ValueError(f"the judge's tokenizer cannot tell the candidates {list(candidates)} "
                         "apart after the reply prefix")
    ids = [r[shared] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the judge's tokenizer maps the candidates {list(candidates)} to "
                         "the same first token")
    return rows[0][:shared], ids


def _last_logits(decoder, variables, input_ids, attention_mask):
    logits = decoder.full_logits(variables, input_ids, attention_mask)
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)


_last_logits_jit = jax.jit(_last_logits, static_argnames=("decoder",))


class ModelJudge:
    def __init__(self, model, variables: dict, tokenizer, batch_size: int = 8,
                 name: str = "model", prompt_bucket: int = 64, max_prompt_length: int = 2048):
        self.decoder = decoder_for(model)
        self.variables, self.tokenizer = variables, tokenizer
        self.batch_size, self.prompt_bucket = batch_size, prompt_bucket
        self.max_prompt_length = max_prompt_length
        self.vocab_size = self.decoder.llm_config.vocab_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.name = name

    @classmethod
    def from_config(cls, c) -> "ModelJudge":
        j = c.judge
        if not j.init:
            raise ValueError("config.judge.kind='model' needs config.judge.init (the judge model)")
        if not os.path.exists(j.init):
            raise FileNotFoundError(f"config.judge.init: {j.init} does not exist")
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            j.tokenizer or tokenizer_dir(j.init))
        model, params = load_model(j.init, tokenizer=tokenizer)
        name = "model:" + os.path.basename(os.path.normpath(j.init))
        return cls(model, {"params": params}, tokenizer, batch_size=j.batch_size, name=name,
                   max_prompt_length=c.max_prompt_length)

    def _distributions(self, rows: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """For each (prompt ids, candidate ids): the candidates' renormalised probabilities."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            prompts_ = [ids for ids, _ in chunk] + [chunk[-1][0]] * (self.batch_size - len(chunk))
            length = bucket_length(max(map(len, prompts_)), self.prompt_bucket)
            input_ids = np.full((len(prompts_), length), self.pad, np.int32)
            mask = np.zeros((len(prompts_), length), np.int32)
            for i, ids in enumerate(prompts_):
                input_ids[i, length - len(ids):] = ids
                mask[i, length - len(ids):] = 1
            logp = np.asarray(_last_logits_jit(self.decoder, self.variables,
                                               jnp.asarray(input_ids), jnp.asarray(mask)))
            for row, (_, candidates) in enumerate(chunk):
                chosen = logp[row, candidates]
                p = np.exp(chosen - chosen.max())
                out.append(p / p.sum())
        return out

    def _split(self, task: JudgeTask, prefix: str, candidates) -> tuple[Optional[tuple], str]:
        prompt, ids = candidate_split(self.tokenizer, judge_text(task, prefix), candidates)
        if len(prompt) > self.max_prompt_length:
            return None, "prompt_too_long"
        if max(prompt) >= self.vocab_size or max(ids) >= self.vocab_size:
            return None, "token_outside_model_vocabulary"
        return (prompt, ids), ""

    def judge(self, tasks: Iterable[JudgeTask]) -> Iterator[Judgement]:
        tasks = list(tasks)
        failed, verdict_rows, verdict_tasks = {}, [], []
        for task in tasks:
            if task.axis == QA_AXIS:
                row, error = self._split(task, reply_prefix(QA_AXIS), VERDICTS)
                if row is None:
                    failed[task.key] = error
                else:
                    verdict_rows.append(row)
                    verdict_tasks.append(task)
        verdicts = {t.key: (VERDICTS[int(np.argmax(p))], float(p[0]))
                    for t, p in zip(verdict_tasks, self._distributions(verdict_rows))}
        score_rows, score_tasks = [], []
        for task in tasks:
            if task.key in failed:
                continue
            pred = verdicts[task.key][0] if task.axis == QA_AXIS else None
            row, error = self._split(task, reply_prefix(task.axis, pred), SCORES)
            if row is None:
                failed[task.key] = error
            else:
                score_rows.append(row)
                score_tasks.append(task)
        for task in tasks:
            if task.key in failed:
                yield Judgement(task.item_id, task.axis, error=failed[task.key])
        for task, p in zip(score_tasks, self._distributions(score_rows)):
            score = float(np.dot(p, np.arange(len(SCORES))))
            pred, p_yes = verdicts.get(task.key, (None, None))
            reply = f"E[score]={score:.3f}" + ("" if pred is None else f", p(yes)={p_yes:.3f}")
            yield Judgement(task.item_id, task.axis, score=score, pred=pred, reply=reply)
