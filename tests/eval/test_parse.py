"""The judge-reply parser on messy replies: the right reading or a counted failure, never a crash."""

import pytest

from rlaif_jax.eval.parse import parse_reply

# (reply, axis, expected score, expected pred, expected error)
CASES = [
    # The reference's format and its near misses.
    ("{'pred': 'yes', 'score': 4}", "qa", 4, "yes", None),
    ('{"pred": "no", "score": 1}', "qa", 1, "no", None),
    ("Sure! Here is my evaluation:\n{'pred': 'yes', 'score': 5}\nHope this helps.", "qa", 5, "yes", None),
    ("```json\n{\"pred\": \"no\", \"score\": 0}\n```", "qa", 0, "no", None),
    ("{'pred': 'Yes', 'score': '4'}", "qa", 4, "yes", None),
    ("{'pred': True, 'score': 3}", "qa", 3, "yes", None),
    ("{pred: no, score: 2}", "qa", 2, "no", None),  # bare keys and values
    ("{'pred': 'yes', 'score': 4,}", "qa", 4, "yes", None),  # trailing comma
    ("{\u2018pred\u2019: \u2018yes\u2019, \u2018score\u2019: 3}", "qa", 3, "yes", None),  # curly quotes
    ("{'pred': 'yes', 'score': 'four'}", "qa", 4, "yes", None),  # number as a word
    ("{'pred': 'no', 'score': '2/5'}", "qa", 2, "no", None),
    ("{'score': 3.5}", "correctness", 3.5, None, None),
    ("{'Score': 'Five'}", "detail", 5, None, None),
    ("{'score': '8/10'}", "temporal", 4, None, None),  # another scale, rescaled
    # An example restated before the real answer: the last dict wins.
    ("Format: {'score': 0}. My answer: {'score': 4}", "context", 4, None, None),
    # No dict: keyed prose, fractions, leading verdicts.
    ("The prediction matches. pred: yes, score: 4", "qa", 4, "yes", None),
    ("Yes. I would give it a score of four.", "qa", 4, "yes", None),
    ("No, the answer is wrong. Score: 1/5", "qa", 1, "no", None),
    ("I rate this 3 out of 5.", "consistency", 3, None, None),
    ("Score - 2", "correctness", 2, None, None),
    ("score is 5", "detail", 5, None, None),
    # Counted failures.
    ("{'pred': 'yes'}", "qa", None, "yes", "missing_score"),
    ("{'score': 4}", "qa", None, None, "missing_pred"),  # QA needs the verdict too
    ("The prediction is partly right.", "correctness", None, None, "missing_score"),
    ("{'score': 7}", "detail", None, None, "score_out_of_range"),
    ("{'score': -1}", "detail", None, None, "score_out_of_range"),
    ("{'score': 'excellent'}", "detail", None, None, "unreadable_score"),
    ("{'pred': 'maybe', 'score': 3}", "qa", None, None, "unreadable_pred"),
    ("score: 2 ... on reflection, score: 4", "temporal", None, None, "ambiguous_score"),
    ("", "qa", None, None, "empty_reply"),
    ("   \n", "correctness", None, None, "empty_reply"),
    (None, "qa", None, None, "empty_reply"),
    ("{{{{'pred': [}", "qa", None, None, "missing_score"),
    ("{'pred': 'yes', 'score': {'nested': 1}}", "qa", None, "yes", "unreadable_score"),
]


@pytest.mark.parametrize("reply,axis,score,pred,error", CASES)
def test_messy_replies(reply, axis, score, pred, error):
    parsed = parse_reply(reply, axis)
    assert parsed.error == error, parsed
    if error is None:
        assert parsed.ok
        assert parsed.score == pytest.approx(score)
        assert parsed.pred == pred
    else:
        assert not parsed.ok  # a failure, counted by the caller (partial readings are kept)


def test_never_raises_on_garbage():
    garbage = ["{" * 5000, "}" * 100 + "{", "score" * 1000, "{'score': 1e999}", "\x00\xff{'s",
               12345, ["score", 4], {"score": 4}, "{'score': nan}", "score: 4/0"]
    for reply in garbage:
        for axis in ("qa", "correctness", "consistency"):
            parsed = parse_reply(reply, axis)
            assert parsed.ok or parsed.error  # a reading or a named failure
            if parsed.ok:
                assert 0 <= parsed.score <= 5
