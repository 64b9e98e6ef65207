"""A controllable OpenAI-compatible HTTP server for tests and benchmarks (127.0.0.1 only).

Implements ``POST /v1/chat/completions``. Each request gets the next queued :class:`Action` (``enqueue``),
else what ``responder(body, index)`` returns, else the default: a valid JSON answer derived from the prompt.
Every request is recorded (``requests``) with its arrival time and body.

Actions: ``ok`` (valid JSON answer), ``text`` (this exact content), ``malformed`` (not JSON), ``status``
(an HTTP error with headers, e.g. 429 + Retry-After), ``hang`` (wait ``seconds`` before answering, past the
client's timeout), ``close`` (close the connection without any response), ``body`` (HTTP 200 with this exact body,
e.g. not JSON: a broken proxy), ``value`` (HTTP 200 whose message content is this JSON value, e.g. a number),
``logprobs`` (this content, with ``choices[0].logprobs`` in the OpenAI form: the first token's ``top_logprobs``).
Any answer's ``usage`` block can be replaced (``Action.ok().with_usage({"prompt_tokens": "12"})``: a server that
bills in odd types).

Standalone (benchmarks, manual runs)::

    python tests/fake_openai_server.py --port 0 [--delay 0.05]      # prints the base URL, serves until killed
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


SERVER_USAGE = object()  # an Action's default ``usage``: the server's own token counts


@dataclass(frozen=True)
class Action:
    kind: str = "ok"  # ok | text | malformed | status | hang | close | body | value | logprobs
    text: str | None = None
    top_logprobs: tuple[tuple[str, float], ...] = ()
    value: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    usage: Any = SERVER_USAGE

    def with_usage(self, usage: Any) -> "Action":
        """This action with ``usage`` as the answer's whole ``usage`` field (any JSON value)."""
        return replace(self, usage=usage)

    @staticmethod
    def ok() -> "Action":
        return Action("ok")

    @staticmethod
    def content(text: str) -> "Action":
        return Action("text", text=text)

    @staticmethod
    def malformed(text: str = "Sure! Here it is: {description: oops") -> "Action":
        return Action("malformed", text=text)

    @staticmethod
    def error(status: int, headers: dict[str, str] | None = None, body: str | None = None) -> "Action":
        return Action("status", status=status, headers=dict(headers or {}), text=body)

    @staticmethod
    def hang(seconds: float) -> "Action":
        return Action("hang", seconds=seconds)

    @staticmethod
    def close() -> "Action":
        return Action("close")

    @staticmethod
    def body(text: str) -> "Action":
        return Action("body", text=text)

    @staticmethod
    def content_value(value: Any) -> "Action":
        return Action("value", value=value)

    @staticmethod
    def logprobs(text: str, top: dict[str, float]) -> "Action":
        """Answer ``text`` whose first token's alternatives are ``top`` (token -> log-probability)."""
        return Action("logprobs", text=text, top_logprobs=tuple(top.items()))


def text_of(content: Any) -> str:
    """A message's text: the string, or the text parts of a multimodal content list."""
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def image_parts(body: dict[str, Any]) -> list[str]:
    """The image URLs of a request's messages (``{"type": "image_url", "image_url": {"url": ...}}`` parts)."""
    return [p["image_url"]["url"] for m in body.get("messages", []) if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url"]


@dataclass(frozen=True)
class Received:
    index: int
    time: float  # time.monotonic() at arrival
    path: str
    body: dict[str, Any]
    authorization: str | None

    @property
    def user_content(self) -> str:
        """The first user message: identifies the input asked about."""
        for m in self.body.get("messages", []):
            if m.get("role") == "user":
                return text_of(m.get("content"))
        return ""


_SUBJECT = re.compile(r"^(?:Mention|Name):\s*(.+)$", re.MULTILINE)


def default_answer(body: dict[str, Any]) -> str:
    """A valid answer naming the mention/entity found in the first user message."""
    user = next((text_of(m.get("content")) for m in body.get("messages", []) if m.get("role") == "user"), "")
    m = _SUBJECT.search(user)
    subject = m.group(1).strip() if m else "unknown"
    return json.dumps({"description": f"{subject} is a test subject.", "type": "thing",
                       "attributes": {"source": "fake", "subject": subject}})


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog (5) drops connections at 64 in flight
    daemon_threads = True


class FakeOpenAIServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, delay: float = 0.0,
                 responder: Callable[[dict[str, Any], int], Action | None] | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fake server only listens on the loopback interface")
        self.delay = delay
        self.responder = responder
        self.requests: list[Received] = []
        self._plan: deque[Action] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # Headers and body go out as separate writes: without this, Nagle + delayed ACK add ~40 ms.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                server._handle(self)

            def do_GET(self):  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    server._send_json(self, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    server._send_json(self, 404, {"error": {"message": "not found"}})

        self._httpd = _Server((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *actions: Action) -> None:
        with self._lock:
            self._plan.extend(actions)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def input_counts(self) -> Counter:
        """How many times each input (first user message) was asked about."""
        return Counter(r.user_content for r in self.snapshot())

    def start(self) -> "FakeOpenAIServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- serving ------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        if len(raw) < length:
            # The client died while sending (e.g. SIGKILL mid-request): nothing arrived to answer or to bill.
            h.close_connection = True
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        with self._lock:
            index = len(self.requests)
            self.requests.append(Received(index=index, time=time.monotonic(), path=h.path, body=body,
                                          authorization=h.headers.get("Authorization")))
            action = self._plan.popleft() if self._plan else None
        if action is None and self.responder is not None:
            action = self.responder(body, index)
        action = action or Action.ok()
        if not h.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        if self.delay:
            self._stopping.wait(self.delay)
        if action.kind == "close":
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if action.kind == "status":
            payload = action.text or json.dumps({"error": {"message": f"fake HTTP {action.status}",
                                                           "type": "fake_error", "code": None}})
            self._send(h, action.status, payload.encode(), action.headers)
            return
        if action.kind == "body":
            self._send(h, 200, (action.text or "").encode(), {})
            return
        if action.kind == "hang":
            self._stopping.wait(action.seconds)
        if action.kind == "value":
            content = action.value
        elif action.kind in ("text", "malformed", "logprobs"):
            content = action.text or ""
        else:
            content = default_answer(body)
        completion = self._completion(body, content, index)
        if action.usage is not SERVER_USAGE:
            completion["usage"] = action.usage
        if action.kind == "logprobs":
            first = action.top_logprobs[0] if action.top_logprobs else (content, 0.0)
            completion["choices"][0]["logprobs"] = {"content": [{
                "token": first[0], "logprob": first[1], "bytes": None,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in action.top_logprobs]}]}
        self._send_json(h, 200, completion)

    @staticmethod
    def _completion(body: dict[str, Any], content: Any, index: int) -> dict[str, Any]:
        prompt_chars = sum(len(text_of(m.get("content"))) for m in body.get("messages", []))
        pt, ct = max(1, prompt_chars // 4), max(1, len(json.dumps(content)) // 4)
        return {
            "id": f"chatcmpl-fake-{index}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }

    def _send_json(self, h: BaseHTTPRequestHandler, status: int, obj: Any) -> None:
        self._send(h, status, json.dumps(obj).encode(), {})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str]) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(payload)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True  # the client gave up (timeout): nothing to do


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    args = ap.parse_args()
    srv = FakeOpenAIServer(port=args.port, delay=args.delay).start()
    print(srv.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
