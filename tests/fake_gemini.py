"""A fake Gemini API on 127.0.0.1, spoken to by the REAL google-genai SDK (tests and bench).

``genai.Client(api_key=..., http_options=types.HttpOptions(base_url=server.url))`` sends
``POST /v1/models/{model}:generateContent`` (google-genai 3.x with a base_url; ``/v1beta/`` is accepted too)
with the image as base64 ``inlineData``. The server answers from a *script*: a list of replies consumed one
per request (thread-safe), then ``default`` for every further request. Replies are small functions of the
recorded request; the helpers below make the answers the real API gives (shapes from
ai.google.dev/api/generate-content and the google-genai types):

    ok()                  200, finishReason STOP, JSON {"rationale": ..., "score": <the score in the prompt>}
    rate_limited("1s")    429 RESOURCE_EXHAUSTED with google.rpc.RetryInfo retryDelay (+ Retry-After header)
    server_error(503)     503 UNAVAILABLE
    empty_stop()          200, STOP, no text
    max_tokens()          200, MAX_TOKENS, partial JSON
    blocked("SAFETY")     200, no candidates, promptFeedback.blockReason
    malformed_json()      200, STOP, text that is not JSON
    answer(text, finish)  anything else

Every request is recorded (:class:`Recorded`: path, model, prompt, system text, decoded PNG bytes, arrival time,
reply name). ``latency_s`` delays every answer (the server is threaded, so concurrent requests overlap).

Run standalone: ``python tests/fake_gemini.py [--latency 1.0]`` prints its URL and serves until Ctrl-C.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loopback import start_server, stop_server

_PATH = re.compile(r"^/(?:v1|v1beta|v1alpha)/models/([^:/]+):generateContent$")
_SCORE = re.compile(r"rated (\d+(?:\.\d+)?)")

OK_RATIONALE = (
    "Fine grainy noise covers the liver and the abdominal wall, and faint thin streaks cross the soft tissue. "
    "Organ and vessel edges remain fairly sharp, while subtle low-contrast detail is partly masked by the noise "
    "texture, which limits confidence for small lesions."
)


@dataclass
class Recorded:
    """One request as the server saw it."""

    path: str
    model: str
    body: dict[str, Any]
    prompt: str
    system: str | None
    image_png: bytes | None
    api_key_sent: bool
    t: float
    reply: str = ""

    @property
    def score(self) -> float | None:
        m = _SCORE.search(self.prompt)
        return float(m.group(1)) if m else None


Reply = Callable[[Recorded], tuple[int, dict[str, Any], dict[str, str]]]

USAGE = {"promptTokenCount": 1290, "candidatesTokenCount": 80, "thoughtsTokenCount": 500, "totalTokenCount": 1870}


def _named(name: str, fn: Reply) -> Reply:
    fn.__name__ = name
    return fn


def answer(text: str | None, finish: str = "STOP", usage: dict | None = None) -> Reply:
    """A 200 answer with one candidate holding ``text`` (no part when None) and ``finish``."""

    def reply(req: Recorded) -> tuple[int, dict, dict]:
        parts = [] if text is None else [{"text": text}]
        cand = {"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}
        return 200, {"candidates": [cand], "usageMetadata": usage or USAGE, "modelVersion": req.model}, {}

    return _named(f"answer({finish})", reply)


def ok(rationale: str = OK_RATIONALE, score: float | None = None) -> Reply:
    """A valid structured answer; ``score`` defaults to the score written in the prompt."""

    def reply(req: Recorded) -> tuple[int, dict, dict]:
        s = req.score if score is None else score
        return answer(json.dumps({"rationale": rationale, "score": s}))(req)

    return _named("ok", reply)


def rate_limited(retry_delay: str = "1s", retry_after_header: bool = True) -> Reply:
    """429 RESOURCE_EXHAUSTED with RetryInfo (the shape of the Gemini API's quota errors)."""

    def reply(req: Recorded) -> tuple[int, dict, dict]:
        body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                          "message": "You exceeded your current quota, please check your plan and billing details.",
                          "details": [
                              {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                               "violations": [{"quotaMetric": "generate_content_requests", "quotaId": "PerMinute"}]},
                              {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]}}
        headers = {"Retry-After": str(int(float(retry_delay.rstrip("s")) + 0.999))} if retry_after_header else {}
        return 429, body, headers

    return _named("rate_limited", reply)


def server_error(status: int = 503) -> Reply:
    def reply(req: Recorded) -> tuple[int, dict, dict]:
        return status, {"error": {"code": status, "status": "UNAVAILABLE",
                                  "message": "The model is overloaded. Please try again later."}}, {}

    return _named(f"server_error({status})", reply)


def empty_stop() -> Reply:
    return _named("empty_stop", answer(None, "STOP"))


def max_tokens(partial: str = '{"rationale": "Moderate noise is seen over the li') -> Reply:
    return _named("max_tokens", answer(partial, "MAX_TOKENS",
                                       {**USAGE, "candidatesTokenCount": 12, "thoughtsTokenCount": 8180}))


def blocked(reason: str = "SAFETY") -> Reply:
    def reply(req: Recorded) -> tuple[int, dict, dict]:
        return 200, {"promptFeedback": {"blockReason": reason}, "usageMetadata": {"promptTokenCount": 1290}}, {}

    return _named("blocked", reply)


def malformed_json() -> Reply:
    return _named("malformed_json", answer('{"rationale": "Noise is moderate", score: 2.2,}'))


def status(code: int, message: str = "error") -> Reply:
    """Any HTTP error status (e.g. 403 PERMISSION_DENIED, 400 INVALID_ARGUMENT)."""

    def reply(req: Recorded) -> tuple[int, dict, dict]:
        return code, {"error": {"code": code, "status": "ERROR", "message": message}}, {}

    return _named(f"status({code})", reply)


@dataclass
class FakeGemini:
    """Threaded fake Gemini server. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        script: replies for the first requests, in arrival order.
        default: reply after the script is used up.
        latency_s: seconds every answer is delayed.
    """

    script: Iterable[Reply] = ()
    default: Reply = field(default_factory=ok)
    latency_s: float = 0.0
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._script = list(self.script)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    def set_script(self, replies: Iterable[Reply], default: Reply | None = None) -> None:
        with self._lock:
            self._script = list(replies)
            if default is not None:
                self.default = default

    def _next(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else self.default

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        m = _PATH.match(handler.path.split("?")[0])
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        if handler.command != "POST" or not m:
            return self._send(handler, 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": handler.path}})
        body = json.loads(raw or b"{}")
        texts, png = [], None
        for content in body.get("contents", []):
            for part in content.get("parts", []):
                if "text" in part:
                    texts.append(part["text"])
                inline = part.get("inlineData") or part.get("inline_data")
                if inline:
                    png = base64.urlsafe_b64decode(inline["data"] + "=" * (-len(inline["data"]) % 4))
        sys_parts = (body.get("systemInstruction") or {}).get("parts") or []
        req = Recorded(path=handler.path, model=m.group(1), body=body, prompt="\n".join(texts),
                       system="\n".join(p.get("text", "") for p in sys_parts) or None, image_png=png,
                       api_key_sent=bool(handler.headers.get("x-goog-api-key")), t=time.monotonic())
        reply = self._next()
        req.reply = getattr(reply, "__name__", "reply")
        with self._lock:
            self.requests.append(req)
        if self.latency_s:
            time.sleep(self.latency_s)
        code, payload, headers = reply(req)
        self._send(handler, code, payload, headers)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    def start(self) -> FakeGemini:
        self._server = start_server(self._handle)
        return self

    def stop(self) -> None:
        stop_server(self._server)
        self._server = None

    def __enter__(self) -> FakeGemini:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.0)
    a = ap.parse_args()
    with FakeGemini(latency_s=a.latency) as srv:
        print(srv.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
