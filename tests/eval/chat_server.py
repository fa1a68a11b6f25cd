"""A small OpenAI-compatible chat-completions server for tests, on 127.0.0.1, standard library only.

Each request is routed by the item marker in the prediction it grades (`Predicted answer: M`,
the first word), and the server plays that item's scripted behaviours in order, one per request
(the last repeats): ("ok", reply text), ("status", code, retry_after or None), ("sleep", seconds,
reply text) for a slow answer, ("malformed", raw body bytes). It counts requests per item,
records the Authorization headers it saw, and the most requests it had in flight at once.
"""

from __future__ import annotations

import collections
import http.server
import json
import re
import threading
import time

_MARKER = re.compile(r"Predicted answer(?: to question 1)?: (\S+)")


class ChatServer:
    def __init__(self, scripts=None, default=("ok", "{'pred': 'yes', 'score': 4}"),
                 api_key="", delay_s=0.0):
        self.scripts = dict(scripts or {})
        self.default, self.api_key, self.delay_s = default, api_key, delay_s
        self.counts = collections.Counter()
        self.authorizations = set()
        self.bodies = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                try:
                    server._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(self, handler, status, body: bytes, headers=()):
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def completion(text: str) -> bytes:
        return json.dumps({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "stop"}]}).encode()

    def _handle(self, handler):
        length = int(handler.headers.get("Content-Length", 0))
        body = json.loads(handler.rfile.read(length))
        user = body["messages"][-1]["content"]
        match = _MARKER.search(user)
        marker = match.group(1) if match else ""
        with self.lock:
            self.bodies.append(body)
            self.authorizations.add(handler.headers.get("Authorization"))
            attempt = self.counts[marker]
            self.counts[marker] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.api_key and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
                reply = (401, b'{"error": "bad key"}')
            else:
                script = self.scripts.get(marker, [self.default])
                action = script[min(attempt, len(script) - 1)]
                if action[0] == "ok":
                    reply = (200, self.completion(action[1]))
                elif action[0] == "status":
                    headers = [] if action[2] is None else [("Retry-After", str(action[2]))]
                    reply = (action[1], b'{"error": "scripted"}', headers)
                elif action[0] == "sleep":
                    time.sleep(action[1])
                    reply = (200, self.completion(action[2]))
                elif action[0] == "malformed":
                    reply = (200, action[1])
                else:
                    raise ValueError(action)
        finally:
            # Out of flight before the reply is written: the client may send its next request
            # as soon as it has this one's, before this thread would get back here.
            with self.lock:
                self.in_flight -= 1
        self._send(handler, *reply)
