"""A judge behind any OpenAI-compatible chat-completions endpoint (the paper used gpt-3.5-turbo).

`POST {base_url}/chat/completions` with `{"model", "messages", "temperature", "max_tokens"}`;
the reply is `choices[0].message.content`, read by `parse.parse_reply`.

- Concurrency: a thread pool of `concurrency` requests in flight; judgements are yielded as
  they complete.
- Retries: timeouts, connection errors, 408, 429, 5xx and malformed response bodies are retried
  up to `max_retries` times with exponential backoff and full jitter (a 429's Retry-After is
  honoured, capped at `max_backoff_s`). After that the task comes back as a non-final failure
  (a rerun asks again). 401 / 403 / 404 stop the run: every other request would fail the same.
- An unreadable reply is asked again up to `parse_retries` times, then it is a final failure.
- The API key is read from the environment variable named by `api_key_env`, sent only in the
  Authorization header, and never logged, printed or written.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Iterable, Iterator, Optional

from rlaif_jax.data.prompts import judge_messages
from rlaif_jax.eval.judging import Judgement, JudgeTask
from rlaif_jax.eval.parse import parse_reply

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}


class JudgeEndpointError(RuntimeError):
    """The endpoint refuses us for good (bad key, no such model or URL): stop the evaluation."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def _retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class HttpJudge:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, parse_retries: int = 2,
                 temperature: float = 0.0, max_tokens: int = 64, seed: int = 0):
        if not base_url:
            raise ValueError("judge.base_url is required for the http judge")
        if not model:
            raise ValueError("judge.model is required for the http judge")
        if concurrency < 1 or max_retries < 0 or parse_retries < 0 or timeout_s <= 0:
            raise ValueError("judge: concurrency >= 1, max_retries >= 0, parse_retries >= 0 and "
                             "timeout_s > 0 are required")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.__api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not self.__api_key:
            logging.warning("judge: environment variable %s is not set; sending no API key",
                            api_key_env)
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.parse_retries = max_retries, parse_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.name = f"http:{model}"
        self.requests_sent = 0
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"HttpJudge(url={self.url!r}, model={self.model!r}, key_env={self.api_key_env!r})"

    # -- one request ---------------------------------------------------------------------------

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages,
                           "temperature": self.temperature, "max_tokens": self.max_tokens})
        headers = {"Content-Type": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        request = urllib.request.Request(self.url, data=body.encode(), headers=headers,
                                         method="POST")
        with self._count_lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            status = error.code
            error.close()
            if status in FATAL_STATUS:
                raise JudgeEndpointError(
                    f"judge endpoint {self.url} answered HTTP {status} (check judge.base_url, "
                    f"judge.model and the key in ${self.api_key_env})") from None
            if status in RETRYABLE_STATUS:
                raise _Retryable(f"http_{status}",
                                 _retry_after_seconds(error.headers.get("Retry-After")))
            raise _Retryable(f"http_{status}")  # other 4xx: retried too, then counted
        except (socket.timeout, TimeoutError):
            raise _Retryable("timeout") from None
        except urllib.error.URLError as error:
            reason = "timeout" if isinstance(error.reason, (socket.timeout, TimeoutError)) \
                else "connection_error"
            raise _Retryable(reason) from None
        except (ConnectionError, OSError):
            raise _Retryable("connection_error") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("malformed_response") from None
        if not isinstance(content, str):
            raise _Retryable("malformed_response")
        return content

    def _sleep_before_retry(self, attempt: int, retry_after: Optional[float]) -> None:
        ceiling = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
        with self._rng_lock:
            delay = self._rng.uniform(0.0, ceiling)  # full jitter: spreads a burst of retries
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        time.sleep(delay)

    def _ask(self, messages: list[dict]) -> tuple[Optional[str], Optional[str], int]:
        """(reply, transport error, attempts): retries transport failures with backoff."""
        last_error = None
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(messages), None, attempt + 1
            except _Retryable as error:
                last_error = error.reason
                if attempt < self.max_retries:
                    self._sleep_before_retry(attempt, error.retry_after)
        return None, last_error, self.max_retries + 1

    def judge_one(self, task: JudgeTask) -> Judgement:
        messages = judge_messages(task.axis, task.question, task.answer, task.prediction,
                                  task.question_2, task.prediction_2)
        attempts, reply, parsed = 0, None, None
        for _ in range(self.parse_retries + 1):
            reply, transport_error, tries = self._ask(messages)
            attempts += tries
            if transport_error is not None:
                return Judgement(task.item_id, task.axis, error=transport_error, final=False,
                                 attempts=attempts)
            parsed = parse_reply(reply, task.axis)
            if parsed.ok:
                return Judgement(task.item_id, task.axis, score=parsed.score, pred=parsed.pred,
                                 reply=reply, attempts=attempts)
        return Judgement(task.item_id, task.axis, error=parsed.error, reply=reply,
                         attempts=attempts)

    # -- many ----------------------------------------------------------------------------------

    def judge(self, tasks: Iterable[JudgeTask]) -> Iterator[Judgement]:
        tasks = list(tasks)
        if not tasks:
            return
        pool = concurrent.futures.ThreadPoolExecutor(self.concurrency,
                                                     thread_name_prefix="judge")
        futures: list = []
        try:
            futures = [pool.submit(self.judge_one, task) for task in tasks]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()  # JudgeEndpointError propagates and stops the run
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
