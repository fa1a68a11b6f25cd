"""A local model as the judge: scores read from next-token probabilities, checked against the
same computation on the transformers model."""

import numpy as np
import torch

from configs import eval as eval_config
from rlaif_jax.eval.judging import JudgeTask
from rlaif_jax.eval.model_judge import SCORES, VERDICTS, ModelJudge, candidate_split, judge_text
from rlaif_jax.data.prompts import reply_prefix
from tests.support import save_tiny_hf_llama
from tests.support import save_word_tokenizer

VOCAB = 97
WORDS = ["yes", "no", *SCORES, "pred", "score", "{'", "':", "'", "red", "blue", "circle",
         "colour", "what", "is", "the", "it"]


def _reference(hf_model, ids, candidates):
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1)[candidates].numpy()
    p = np.exp(logp - logp.max())
    return p / p.sum()


def test_model_judge_matches_transformers(tmp_path):
    hf_model = save_tiny_hf_llama(str(tmp_path), seed=11, vocab_size=VOCAB)
    tokenizer = save_word_tokenizer(str(tmp_path), VOCAB, WORDS)
    c = eval_config.get_config("local_judge")
    c.judge.init = str(tmp_path)
    c.judge.batch_size = 2  # three tasks: padding rows and filler rows both exercised
    judge = ModelJudge.from_config(c)
    assert judge.name == f"model:{tmp_path.name}"
    tasks = [
        JudgeTask("a", "qa", "what is the colour", "red", "it is red"),
        JudgeTask("b", "correctness", "what is the colour of the circle", "red circle", "blue"),
        JudgeTask("c", "consistency", "what colour", "red", "red", question_2="the colour",
                  prediction_2="blue"),
    ]
    results = {j.item_id: j for j in judge.judge(tasks)}
    assert set(results) == {"a", "b", "c"} and all(j.ok for j in results.values())

    prompt, ids = candidate_split(tokenizer, judge_text(tasks[0], reply_prefix("qa")), VERDICTS)
    assert ids == [3, 4]  # "yes", "no": the split found the right tokens
    p_verdict = _reference(hf_model, prompt, ids)
    pred = "yes" if p_verdict[0] >= p_verdict[1] else "no"
    assert results["a"].pred == pred
    for task in tasks:
        text = judge_text(task, reply_prefix(task.axis, pred if task.axis == "qa" else None))
        prompt, ids = candidate_split(tokenizer, text, SCORES)
        assert ids == list(range(5, 11))
        expected = float(np.dot(_reference(hf_model, prompt, ids), np.arange(6)))
        assert abs(results[task.item_id].score - expected) < 1e-4
        assert 0 <= results[task.item_id].score <= 5
    # Different predictions get different scores (the judge reads its prompt).
    assert len({round(j.score, 6) for j in results.values()}) == 3
