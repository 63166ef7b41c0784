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
    quota_zero()          429 RESOURCE_EXHAUSTED whose quota is "limit: 0" (a free-tier key for a paid model)

Batch API (``client.batches``, inline requests; shapes from google-genai 3.6 ``batches.py`` ``_BatchJob_from_mldev``,
which reads an Operation ``{"name": "batches/...", "metadata": {"state": "BATCH_STATE_...", "output":
{"inlinedResponses": {"inlinedResponses": [...]}}}}``):

    POST /v1beta/models/{model}:batchGenerateContent   create a job (recorded in ``batches``), state PENDING
    GET  /v1beta/batches/{id}                          the job; RUNNING while ``hold_batches`` is set, else it
                                                       SUCCEEDS: every inline request is answered by the script
                                                       like a synchronous one (an error status becomes the
                                                       response's ``error``)
    GET  /v1beta/batches                               the list of jobs (``operations``)

Every request is recorded (:class:`Recorded`: path, model, prompt, system text, decoded PNG bytes, arrival time,
reply name). ``latency_s`` delays every answer (the server is threaded, so concurrent requests overlap).

Run standalone: ``python -m ctiqa.testing.fake_gemini [--latency 1.0]`` prints its URL and serves until Ctrl-C.
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

from ctiqa.testing.loopback import LoopbackServer

_PATH = re.compile(r"^/(?:v1|v1beta|v1alpha)/models/([^:/]+):generateContent$")
_BATCH_CREATE = re.compile(r"^/(?:v1|v1beta|v1alpha)/models/([^:/]+):batchGenerateContent$")
_BATCH_GET = re.compile(r"^/(?:v1|v1beta|v1alpha)/(batches/[^/:]+)$")
_BATCH_LIST = re.compile(r"^/(?:v1|v1beta|v1alpha)/batches$")
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


def quota_zero(model: str = "gemini-2.5-pro") -> Reply:
    """429 whose quota is zero: what a free-tier key gets for a model the free tier does not include."""

    def reply(req: Recorded) -> tuple[int, dict, dict]:
        msg = ("You exceeded your current quota, please check your plan and billing details. Quota exceeded for "
               "metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 0, model: "
               f"{model}")
        return 429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": msg, "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]}}, {}

    return _named("quota_zero", reply)


def status(code: int, message: str = "error") -> Reply:
    """Any HTTP error status (e.g. 403 PERMISSION_DENIED, 400 INVALID_ARGUMENT)."""

    def reply(req: Recorded) -> tuple[int, dict, dict]:
        return code, {"error": {"code": code, "status": "ERROR", "message": message}}, {}

    return _named(f"status({code})", reply)


@dataclass
class FakeBatch:
    """One Batch API job: its inline requests (``{"request": ..., "metadata": ...}``), state and polls."""

    name: str
    model: str
    display_name: str
    requests: list[dict[str, Any]]
    state: str = "BATCH_STATE_PENDING"
    polls: int = 0
    responses: list[dict[str, Any]] = field(default_factory=list)

    def operation(self) -> dict[str, Any]:
        md: dict[str, Any] = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                              "model": f"models/{self.model}", "displayName": self.display_name, "state": self.state,
                              "createTime": "2026-01-01T00:00:00Z", "name": self.name}
        if self.state == "BATCH_STATE_SUCCEEDED":
            md["output"] = {"inlinedResponses": {"inlinedResponses": self.responses}}
        return {"name": self.name, "metadata": md,
                "done": self.state not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")}


def _parse(body: dict[str, Any]) -> tuple[str, str | None, bytes | None]:
    texts, png = [], None
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            if "text" in part:
                texts.append(part["text"])
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:
                png = base64.urlsafe_b64decode(inline["data"] + "=" * (-len(inline["data"]) % 4))
    sys_parts = (body.get("systemInstruction") or {}).get("parts") or []
    return "\n".join(texts), "\n".join(p.get("text", "") for p in sys_parts) or None, png


@dataclass
class FakeGemini(LoopbackServer):
    """Threaded fake Gemini server. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        script: replies for the first requests, in arrival order.
        default: reply after the script is used up.
        latency_s: seconds every answer is delayed.
        hold_batches: Batch API jobs stay RUNNING while True.
        batch_end_state: the state a released job ends in (``BATCH_STATE_SUCCEEDED``, ``..._FAILED``, ...).
    """

    script: Iterable[Reply] = ()
    default: Reply = field(default_factory=ok)
    latency_s: float = 0.0
    requests: list[Recorded] = field(default_factory=list)
    hold_batches: bool = False
    batch_end_state: str = "BATCH_STATE_SUCCEEDED"
    batches: dict[str, FakeBatch] = field(default_factory=dict)
    batch_calls: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._script = list(self.script)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None


    def set_script(self, replies: Iterable[Reply], default: Reply | None = None) -> None:
        with self._lock:
            self._script = list(replies)
            if default is not None:
                self.default = default

    def _next(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else self.default

    def dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?")[0]
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        if any(rx.match(path) for rx in (_BATCH_CREATE, _BATCH_GET, _BATCH_LIST)):
            return self._batch(handler, path, raw)
        m = _PATH.match(path)
        if handler.command != "POST" or not m:
            return self._send(handler, 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": handler.path}})
        body = json.loads(raw or b"{}")
        code, payload, headers = self._answer(handler.path, m.group(1), body,
                                              bool(handler.headers.get("x-goog-api-key")))
        self._send(handler, code, payload, headers)

    def _answer(self, path: str, model: str, body: dict[str, Any], key_sent: bool) -> tuple[int, dict, dict]:
        prompt, system, png = _parse(body)
        req = Recorded(path=path, model=model, body=body, prompt=prompt, system=system, image_png=png,
                       api_key_sent=key_sent, t=time.monotonic())
        reply = self._next()
        req.reply = getattr(reply, "__name__", "reply")
        with self._lock:
            self.requests.append(req)
        if self.latency_s:
            time.sleep(self.latency_s)
        return reply(req)

    def _batch(self, handler: BaseHTTPRequestHandler, path: str, raw: bytes) -> None:
        with self._lock:
            self.batch_calls.append((handler.command, path))
        if (m := _BATCH_CREATE.match(path)) and handler.command == "POST":
            batch = json.loads(raw or b"{}").get("batch") or {}
            reqs = ((batch.get("inputConfig") or {}).get("requests") or {}).get("requests") or []
            with self._lock:
                job = FakeBatch(f"batches/fake{len(self.batches) + 1}", m.group(1), batch.get("displayName", ""), reqs)
                self.batches[job.name] = job
            return self._send(handler, 200, job.operation())
        if (m := _BATCH_GET.match(path)) and handler.command == "GET":
            job = self.batches.get(m.group(1))
            if job is None:
                return self._send(handler, 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": path}})
            job.polls += 1
            if job.state in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
                if self.hold_batches:
                    job.state = "BATCH_STATE_RUNNING"
                elif self.batch_end_state != "BATCH_STATE_SUCCEEDED":
                    job.state = self.batch_end_state
                else:
                    job.responses = []
                    for r in job.requests:
                        code, payload, _ = self._answer(path, job.model, r["request"], True)
                        out = {"response": payload} if code == 200 else {"error": payload.get("error")}
                        job.responses.append(out | ({"metadata": r["metadata"]} if "metadata" in r else {}))
                    job.state = "BATCH_STATE_SUCCEEDED"
            return self._send(handler, 200, job.operation())
        if _BATCH_LIST.match(path) and handler.command == "GET":
            return self._send(handler, 200, {"operations": [j.operation() for j in reversed(self.batches.values())]})
        return self._send(handler, 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": path}})

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
