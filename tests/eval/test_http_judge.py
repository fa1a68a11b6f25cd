"""The HTTP judge against a chat-completions server of the test's own on 127.0.0.1."""

import logging
import time

import pytest

from rlaif_jax.eval.http_judge import HttpJudge, JudgeEndpointError
from rlaif_jax.eval.judging import JudgeTask
from tests.eval.chat_server import ChatServer

KEY = "sk-test-very-secret-4242"


def _task(marker, axis="qa"):
    return JudgeTask(item_id=marker, axis=axis, question="what colour is the circle",
                     answer="red", prediction=f"{marker} it is red")


def _judge(server, monkeypatch, **overrides):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)
    settings = dict(base_url=server.base_url, model="judge-model", api_key_env="TEST_JUDGE_KEY",
                    concurrency=4, timeout_s=0.5, max_retries=3, backoff_s=0.01,
                    max_backoff_s=0.05, parse_retries=1)
    settings.update(overrides)
    return HttpJudge(**settings)


def test_concurrent_requests_scores_and_key_header(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    with ChatServer(api_key=KEY, delay_s=0.1) as server:
        judge = _judge(server, monkeypatch)
        tasks = [_task(f"m{i}", axis="qa" if i % 2 else "detail") for i in range(12)]
        start = time.monotonic()
        results = {j.item_id: j for j in judge.judge(tasks)}
        elapsed = time.monotonic() - start
    assert set(results) == {t.item_id for t in tasks}
    assert all(j.ok and j.score == 4 for j in results.values())
    assert [results[f"m{i}"].pred for i in range(4)] == [None, "yes", None, "yes"]
    assert server.authorizations == {f"Bearer {KEY}"}
    assert server.bodies[0]["model"] == "judge-model"
    assert server.bodies[0]["messages"][0]["role"] == "system"
    assert 2 <= server.max_in_flight <= 4  # concurrent, within the limit
    assert elapsed < 12 * 0.1  # faster than one at a time
    assert KEY not in repr(judge) and KEY not in caplog.text
    assert all(KEY not in str(j) for j in results.values())


def test_failures_are_retried_or_counted(monkeypatch):
    scripts = {
        "rate": [("status", 429, 0), ("status", 429, None), ("ok", "{'pred': 'no', 'score': 1}")],
        "slow": [("sleep", 1.0, "{'pred': 'yes', 'score': 5}"), ("ok", "{'pred': 'yes', 'score': 5}")],
        "junk": [("malformed", b"{not json"), ("malformed", b'{"choices": []}'),
                 ("ok", "Yes! I'd say score: four")],
        "down": [("status", 503, None)],
        "babble": [("ok", "I cannot decide.")],
        "fixed": [("ok", "hmm"), ("ok", "{'pred': 'yes', 'score': '3/5'}")],
        "gone": [("status", 400, None)],
    }
    with ChatServer(scripts) as server:
        judge = _judge(server, monkeypatch)
        results = {j.item_id: j for j in judge.judge([_task(m) for m in scripts])}
    assert (results["rate"].score, results["rate"].pred, results["rate"].attempts) == (1, "no", 3)
    assert (results["slow"].score, results["slow"].attempts) == (5, 2)  # first one timed out
    assert (results["junk"].score, results["junk"].pred, results["junk"].attempts) == (4, "yes", 3)
    # Transport failures after every retry: counted, not final (a rerun asks again).
    assert results["down"].error == "http_503" and not results["down"].final
    assert server.counts["down"] == 4  # 1 + max_retries
    assert results["gone"].error == "http_400" and not results["gone"].final
    # Unreadable replies: asked again (parse_retries=1), then a final, counted failure.
    assert results["babble"].error == "missing_score" and results["babble"].final
    assert results["babble"].reply == "I cannot decide."
    assert server.counts["babble"] == 2
    assert results["fixed"].ok and results["fixed"].score == 3 and server.counts["fixed"] == 2


def test_retry_after_is_honoured(monkeypatch):
    with ChatServer({"wait": [("status", 429, 0.4), ("ok", "{'score': 2}")]}) as server:
        judge = _judge(server, monkeypatch, max_backoff_s=5.0)
        start = time.monotonic()
        (result,) = list(judge.judge([_task("wait", axis="temporal")]))
        elapsed = time.monotonic() - start
    assert result.ok and result.score == 2
    assert elapsed >= 0.4


def test_bad_key_stops_the_run(monkeypatch):
    with ChatServer(api_key="the-right-key") as server:
        judge = _judge(server, monkeypatch)
        with pytest.raises(JudgeEndpointError, match="HTTP 401") as raised:
            list(judge.judge([_task(f"m{i}") for i in range(3)]))
    assert KEY not in str(raised.value)


def test_unreachable_endpoint_is_a_counted_transport_failure(monkeypatch):
    with ChatServer() as server:
        url = server.base_url
    judge = HttpJudge(base_url=url, model="m", api_key_env="", max_retries=1, backoff_s=0.01,
                      timeout_s=0.5)
    (result,) = list(judge.judge([_task("x")]))
    assert result.error == "connection_error" and not result.final and result.attempts == 2
