"""Teachers: who writes the rationale for (rendered CT image, true score).

Two layers, so that the evaluation harness can reuse the remote calls for zero-shot scoring:

* **Clients** (:class:`GeminiClient`, :class:`OpenAICompatClient`): one async method
  ``generate(image, prompt, system=None, schema=None) -> CallResult`` that sends one RGB image (PNG bytes) and one
  text prompt, retries transient errors (429, 5xx, timeouts, dropped connections) with exponential backoff that
  honours the server's own retry delay, and turns every other outcome into a :class:`CallResult` that either holds
  a usable answer (``ok``) or says why not (``error``). A result is ``ok`` only when the finish reason is STOP
  (OpenAI: ``stop``), the text is not empty and, when a JSON schema was given, the text parses as JSON and
  validates against it. It never raises for a per-request problem; it raises :class:`TeacherConfigError` (a
  :class:`ctiqa.CTIQAError`) only for problems that would fail every request (bad key, unknown model).
* **Teachers** (:class:`LLMTeacher`, :class:`TemplateTeacher`): ``explain(image, score, metadata) ->
  CallResult`` with ``result.rationale`` set on success. :func:`make_teacher` builds one from CLI names.

Failure reasons (``CallResult.error`` starts with one of these codes, then ``": detail"``):
``blocked_prompt`` (no candidates; ``prompt_feedback.block_reason``), ``no_candidates``, ``finish_reason``
(MAX_TOKENS, SAFETY, RECITATION, ... / OpenAI ``length``, ``content_filter``), ``empty_answer``,
``invalid_json``, ``schema_mismatch``, ``request_too_large``, ``http_<status>`` (non-retryable status, or a
retryable one after the last attempt), ``timeout``, ``connection_error``.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import tenacity
from PIL import Image

from ctiqa import CTIQAError

#: Gemini API limit on the whole inline request (image + text), 20 MB (ai.google.dev/gemini-api/docs/image-understanding,
#: "inline image data": total request size 20 MB). Base64 inflates bytes by 4/3, so raw PNG bytes must stay below it.
GEMINI_INLINE_LIMIT_BYTES = 20_000_000
_MAX_INLINE_PNG_BYTES = int(GEMINI_INLINE_LIMIT_BYTES * 3 / 4) - 100_000

#: HTTP statuses retried with backoff: request timeout, rate limit, server errors (the same set google-genai's
#: ``HttpRetryOptions`` uses by default).
RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)
#: Statuses that would fail every request of a run (bad key, no permission, unknown model): abort instead.
#: The Gemini API answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID: fatal too.
FATAL_STATUS = (401, 403, 404)

#: USD per 1M tokens (input, output incl. thinking), Gemini API paid tier, prompts <= 200k tokens.
#: Source: https://ai.google.dev/gemini-api/docs/pricing (Gemini 2.5 GA prices, checked 2025-07). Thinking tokens
#: are billed as output. Override with ``--price-input`` / ``--price-output``.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
}


class TeacherConfigError(CTIQAError):
    """A teacher problem that would fail every request (missing key, 401/403/404 from the server)."""


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Usage:
    """Token counts of one call (or a sum of calls), from the server's usage metadata.

    ``prompt_tokens`` (Gemini ``prompt_token_count``, image included), ``output_tokens`` (Gemini
    ``candidates_token_count``, OpenAI ``completion_tokens`` minus reasoning), ``thoughts_tokens`` (Gemini
    ``thoughts_token_count``, OpenAI ``completion_tokens_details.reasoning_tokens``).
    """

    prompt_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.output_tokens + other.output_tokens,
                     self.thoughts_tokens + other.thoughts_tokens)

    def cost_usd(self, price_input: float, price_output: float) -> float:
        """Estimated cost in USD at ``price_*`` USD per 1M tokens (thinking billed as output)."""
        return (self.prompt_tokens * price_input + (self.output_tokens + self.thoughts_tokens) * price_output) / 1e6


@dataclass
class CallResult:
    """The outcome of one request (after retries).

    Attributes:
        ok: True when ``text`` is a complete, usable answer (see the module docstring).
        text: the answer text (thought parts excluded); may hold a partial answer on failure.
        parsed: the parsed JSON object when a schema was requested and the text parsed.
        finish_reason: the server's finish reason (Gemini ``STOP``/``MAX_TOKENS``/..., OpenAI ``stop``/...).
        error: ``"<code>: <detail>"`` when not ok, else None.
        usage: token counts summed over every attempt that returned an answer.
        attempts: HTTP attempts made (1 = no retry).
        seconds: wall time including retries.
        model: the model id that was asked.
    """

    ok: bool
    text: str | None = None
    parsed: dict[str, Any] | None = None
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    attempts: int = 1
    seconds: float = 0.0
    model: str = ""

    @property
    def reason(self) -> str | None:
        """The failure code (``error`` up to the first ``:``), None on success."""
        return None if self.error is None else self.error.split(":", 1)[0]

    @property
    def rationale(self) -> str | None:
        """``parsed["rationale"]`` when present (teacher answers), else None."""
        value = (self.parsed or {}).get("rationale")
        return value if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CallResult:
        d = dict(d)
        d["usage"] = Usage(**d.get("usage") or {})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------------- helpers
#: ``image.info`` key holding the PNG an image was decoded from (set by ``datasets_builder.build.Item.image``):
#: :func:`png_bytes` then sends those exact bytes instead of encoding again (a noisy 512x512 slice costs
#: 0.1-0.2 s of CPU to encode, which otherwise caps the useful concurrency on a small machine).
SOURCE_PNG_KEY = "ctiqa_source_png"
#: zlib level for PNG encoding. On a noisy 512x512 CT slice level 3 took 0.07 s and 281 kB against PIL's default
#: 6: 0.21 s and 310 kB (measured here, Pillow 13): noise does not compress, so the higher level only costs time.
PNG_COMPRESS_LEVEL = 3


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of an RGB PIL image (lossless: the teacher sees exactly the student's pixels).

    Returns ``image.info[SOURCE_PNG_KEY]`` when present (the unmodified PNG the image was decoded from).
    """
    source = image.info.get(SOURCE_PNG_KEY)
    if isinstance(source, bytes):
        return source
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def parse_json_answer(text: str) -> Any:
    """Parse a JSON answer, tolerating a surrounding Markdown code fence. Raises ``ValueError`` if it is not JSON."""
    s = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, flags=re.DOTALL)
    return json.loads(m.group(1) if m else s)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
    "object": (dict,), "array": (list,),
}


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Validate ``value`` against the JSON-schema subset response schemas use (``type``, ``properties``,
    ``required``, ``items``, ``enum``). Returns a list of problems (empty = valid)."""
    errs: list[str] = []
    t = schema.get("type")
    if isinstance(t, str):
        py = _JSON_TYPES.get(t.lower())
        bad_bool = isinstance(value, bool) and t.lower() in ("number", "integer")
        if py is not None and (not isinstance(value, py) or bad_bool):
            return [f"{where}: expected {t}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errs.append(f"{where}: missing key {key!r}")
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                errs += schema_errors(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errs += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errs


def finish_answer(text: str | None, finish_reason: str | None, schema: dict[str, Any] | None,
                  ok_reason: str) -> tuple[bool, dict[str, Any] | None, str | None]:
    """Decide whether an answer is usable. Returns ``(ok, parsed, error)``."""
    if finish_reason != ok_reason:
        return False, None, f"finish_reason: {finish_reason}"
    if not text or not text.strip():
        return False, None, "empty_answer: finish reason was STOP but the text is empty"
    if schema is None:
        return True, None, None
    try:
        parsed = parse_json_answer(text)
    except ValueError as e:
        return False, None, f"invalid_json: {e}"
    problems = schema_errors(parsed, schema)
    if problems:
        return False, parsed if isinstance(parsed, dict) else None, "schema_mismatch: " + "; ".join(problems)
    return True, parsed, None


# --------------------------------------------------------------------------------------------------- retries
def _duration_s(value: Any) -> float | None:
    """``"2s"`` / ``"1.5s"`` (protobuf Duration JSON) -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*s?\s*", value)
        if m:
            return float(m.group(1))
    return None


def _headers_of(exc: BaseException) -> Any:
    response = getattr(exc, "response", None)
    return getattr(response, "headers", None) or {}


def status_of(exc: BaseException) -> int | None:
    """HTTP status of a google-genai ``APIError`` or an openai ``APIStatusError``, else None."""
    for attr in ("code", "status_code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int):
            return v
    return None


def server_retry_delay(exc: BaseException) -> float | None:
    """The delay (s) the server asked for, or None.

    Looks at, in order: a Gemini error body's ``google.rpc.RetryInfo`` ``retryDelay`` (e.g. ``"2s"``; 429 answers
    carry it, see ai.google.dev/gemini-api/docs/rate-limits), the ``retry-after-ms`` header (OpenAI servers), and
    the HTTP ``Retry-After`` header (RFC 9110 §10.2.3: seconds or an HTTP date).
    """
    details = getattr(exc, "details", None)
    if isinstance(details, dict):
        items = (details.get("error") or {}).get("details") or details.get("details") or []
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
                d = _duration_s(item.get("retryDelay"))
                if d is not None:
                    return d
    headers = _headers_of(exc)
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return float(ms) / 1000.0
        ra = headers.get("retry-after")
    except (AttributeError, TypeError, ValueError):
        return None
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(ra)
            return max(0.0, dt.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _transient_types() -> tuple[type[BaseException], ...]:
    types_: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        import aiohttp

        types_.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover - aiohttp ships with our google-genai install
        pass
    for mod in ("httpx", "httpx2"):
        try:
            types_.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    try:
        import openai

        types_ += [openai.APIConnectionError, openai.APITimeoutError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types_)


_TRANSIENT = _transient_types()


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: statuses in :data:`RETRYABLE_STATUS`, timeouts, dropped connections."""
    status = status_of(exc)
    if status is not None:
        return status in RETRYABLE_STATUS
    return isinstance(exc, _TRANSIENT)


@dataclass
class RetryPolicy:
    """Exponential backoff for transient errors.

    Wait before retry n (n = 1, 2, ...) is ``min(max_delay, initial_delay * 2**(n-1)) + uniform(0, jitter)``,
    raised to the server's requested delay (:func:`server_retry_delay`, capped at ``max_server_delay``).
    Defaults follow google-genai's (5 attempts, 1 s initial, 60 s max) with one more attempt, because paid
    batch runs meet rate limits often. All in seconds.
    """

    max_attempts: int = 6
    initial_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 1.0
    max_server_delay: float = 600.0

    def wait(self, retry_state: tenacity.RetryCallState) -> float:
        n = retry_state.attempt_number
        base = min(self.max_delay, self.initial_delay * 2 ** (n - 1)) + random.uniform(0, self.jitter)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        server = server_retry_delay(exc) if exc is not None else None
        return base if server is None else max(base, min(server, self.max_server_delay))


def is_fatal(exc: BaseException) -> bool:
    """True for errors that would fail every request: :data:`FATAL_STATUS`, or a 400 for an invalid API key."""
    status = status_of(exc)
    if status in FATAL_STATUS:
        return True
    text = f"{getattr(exc, 'details', '')} {getattr(exc, 'message', '')}"
    return status == 400 and ("API_KEY_INVALID" in text or "API key not valid" in text)


def _error_result(exc: BaseException, model: str) -> CallResult:
    status = status_of(exc)
    if status is not None:
        msg = getattr(exc, "message", None) or str(exc)
        return CallResult(ok=False, error=f"http_{status}: {str(msg)[:300]}", model=model)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in type(exc).__name__:
        return CallResult(ok=False, error=f"timeout: {type(exc).__name__}", model=model)
    return CallResult(ok=False, error=f"connection_error: {type(exc).__name__}: {str(exc)[:200]}", model=model)


async def call_with_retries(send, policy: RetryPolicy, model: str, fatal_hint: str) -> CallResult:
    """Run ``await send()`` (returns a :class:`CallResult`) with ``policy``; exceptions become failed results.

    Raises:
        TeacherConfigError: :func:`is_fatal` errors (401/403/404, invalid key; ``fatal_hint`` says what to check).
    """
    t0 = time.perf_counter()
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(max(1, policy.max_attempts)),
        wait=policy.wait,
        retry=tenacity.retry_if_exception(is_transient),
        reraise=True,
    )
    attempts = 0
    try:
        async for attempt in retrying:
            with attempt:
                attempts = attempt.retry_state.attempt_number
                result = await send()
    except Exception as exc:  # noqa: BLE001 - every per-request failure becomes a recorded result
        if is_fatal(exc):
            raise TeacherConfigError(f"{model}: the server refused the request ({str(exc)[:300]}); {fatal_hint}") from exc
        result = _error_result(exc, model)
    result.attempts = attempts
    result.seconds = time.perf_counter() - t0
    result.model = model
    return result


# --------------------------------------------------------------------------------------------------- clients
class GeminiClient:
    """Async Gemini client (google-genai) with structured output, thinking budget and the retry policy.

    Args:
        model: Gemini model id (default ``gemini-2.5-pro``, the paper's teacher).
        api_key: defaults to ``$GEMINI_API_KEY`` (then ``$GOOGLE_API_KEY``); never logged.
        base_url: API root, e.g. a proxy or a test server (``None`` = Google's endpoint).
        max_output_tokens: output limit per answer, thinking included (Gemini 2.5 counts thoughts against it).
        thinking_budget: thinking tokens (2.5 Pro: 128-32768, it cannot switch thinking off; ``None`` = dynamic;
            ``0`` switches it off on Flash models).
        temperature: sampling temperature (``None`` = the model's default).
        timeout_s: per-attempt timeout in seconds.
        retry: the :class:`RetryPolicy`.
    Raises:
        TeacherConfigError: no API key.
    """

    def __init__(self, model: str = "gemini-2.5-pro", *, api_key: str | None = None, base_url: str | None = None,
                 max_output_tokens: int = 8192, thinking_budget: int | None = 2048,
                 temperature: float | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy | None = None) -> None:
        from google import genai
        from google.genai import types

        key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise TeacherConfigError("the gemini teacher needs an API key: set GEMINI_API_KEY in the environment")
        self.model = model
        self.max_output_tokens = max_output_tokens
        self.thinking_budget = thinking_budget
        self.temperature = temperature
        self.retry = retry or RetryPolicy()
        self._types = types
        # SDK retries off (attempts=1): our policy retries, because it honours the server's RetryInfo delay
        # and the SDK's HttpRetryOptions does not (google/genai/_api_client.py: retry_args, a plain
        # wait_exponential_jitter). attempts=1 also disables the SDK's implicit aiohttp reconnect loop.
        self._client = genai.Client(api_key=key, http_options=types.HttpOptions(
            base_url=base_url, timeout=int(timeout_s * 1000), retry_options=types.HttpRetryOptions(attempts=1)))

    async def generate(self, image: Image.Image, prompt: str, system: str | None = None,
                       schema: dict[str, Any] | None = None) -> CallResult:
        """One image + prompt -> :class:`CallResult`. JSON mode (``response_schema``) when ``schema`` is given."""
        t = self._types
        data = await asyncio.to_thread(png_bytes, image)  # zlib releases the GIL: encode off the event loop
        if len(data) > _MAX_INLINE_PNG_BYTES:
            return CallResult(ok=False, error=f"request_too_large: PNG is {len(data)} bytes; the inline request "
                              f"limit is {GEMINI_INLINE_LIMIT_BYTES} bytes after base64", model=self.model)
        config = t.GenerateContentConfig(
            system_instruction=system,
            max_output_tokens=self.max_output_tokens,
            temperature=self.temperature,
            thinking_config=None if self.thinking_budget is None else t.ThinkingConfig(
                thinking_budget=self.thinking_budget),
            response_mime_type="application/json" if schema is not None else None,
            response_schema=schema,
        )
        contents = [t.Part.from_bytes(data=data, mime_type="image/png"), prompt]

        async def send() -> CallResult:
            resp = await self._client.aio.models.generate_content(model=self.model, contents=contents, config=config)
            return self._to_result(resp, schema)

        return await call_with_retries(send, self.retry, self.model,
                                       "check GEMINI_API_KEY, your access to the model and --model")

    def _to_result(self, resp: Any, schema: dict[str, Any] | None) -> CallResult:
        um = resp.usage_metadata
        usage = Usage(prompt_tokens=getattr(um, "prompt_token_count", None) or 0,
                      output_tokens=getattr(um, "candidates_token_count", None) or 0,
                      thoughts_tokens=getattr(um, "thoughts_token_count", None) or 0) if um else Usage()
        if not resp.candidates:
            fb = resp.prompt_feedback
            block = getattr(fb, "block_reason", None) if fb else None
            if block is not None:
                name = getattr(block, "name", None) or str(block)
                msg = getattr(fb, "block_reason_message", None)
                return CallResult(ok=False, error=f"blocked_prompt: {name}" + (f" ({msg})" if msg else ""),
                                  usage=usage)
            return CallResult(ok=False, error="no_candidates: the answer holds no candidates", usage=usage)
        cand = resp.candidates[0]
        fr = cand.finish_reason
        finish = None if fr is None else (getattr(fr, "name", None) or str(fr))
        parts = (cand.content.parts if cand.content and cand.content.parts else None) or []
        text = "".join(p.text for p in parts if p.text and not p.thought)
        ok, parsed, error = finish_answer(text, finish, schema, "STOP")
        return CallResult(ok=ok, text=text or None, parsed=parsed, finish_reason=finish, error=error, usage=usage)

    async def aclose(self) -> None:
        """Close the underlying HTTP session."""
        await self._client.aio.aclose()


class OpenAICompatClient:
    """Async client for any OpenAI-compatible chat server (vLLM, Ollama, llama.cpp server), same interface as
    :class:`GeminiClient`. The image travels as a ``data:image/png;base64`` URL; JSON mode uses
    ``response_format={"type": "json_schema", ...}``.

    Args:
        model: the served model name.
        base_url: e.g. ``http://localhost:8000/v1`` (vLLM) or ``http://localhost:11434/v1`` (Ollama).
        api_key: defaults to ``$OPENAI_API_KEY``, else a dummy (local servers usually need none).
        max_output_tokens, temperature, timeout_s, retry: as for :class:`GeminiClient`.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 max_output_tokens: int = 2048, temperature: float | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy | None = None) -> None:
        import openai

        self.model = model
        self.max_output_tokens = max_output_tokens
        self.temperature = temperature
        self.retry = retry or RetryPolicy()
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY")
                                          or "not-needed", timeout=timeout_s, max_retries=0)

    async def generate(self, image: Image.Image, prompt: str, system: str | None = None,
                       schema: dict[str, Any] | None = None) -> CallResult:
        import base64

        url = "data:image/png;base64," + base64.b64encode(await asyncio.to_thread(png_bytes, image)).decode("ascii")
        messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": prompt}]})
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_output_tokens}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "answer", "schema": schema}}

        async def send() -> CallResult:
            resp = await self._client.chat.completions.create(**kwargs)
            u = resp.usage
            details = getattr(u, "completion_tokens_details", None) if u else None
            thoughts = (getattr(details, "reasoning_tokens", None) or 0) if details else 0
            usage = Usage(prompt_tokens=(u.prompt_tokens or 0) if u else 0,
                          output_tokens=max(0, ((u.completion_tokens or 0) if u else 0) - thoughts),
                          thoughts_tokens=thoughts)
            if not resp.choices:
                return CallResult(ok=False, error="no_candidates: the answer holds no choices", usage=usage)
            choice = resp.choices[0]
            text = choice.message.content if choice.message else None
            ok, parsed, error = finish_answer(text, choice.finish_reason, schema, "stop")
            return CallResult(ok=ok, text=text or None, parsed=parsed, finish_reason=choice.finish_reason,
                              error=error, usage=usage)

        return await call_with_retries(send, self.retry, self.model,
                                       "check --base-url, --model and OPENAI_API_KEY")

    async def aclose(self) -> None:
        await self._client.close()


# --------------------------------------------------------------------------------------------------- teachers
class Teacher(Protocol):
    """Writes a rationale for one rendered image whose true score is known.

    Attributes:
        model_id: recorded in the dataset's ``teacher`` column and part of the answer-cache key.
        cacheable: whether answers go through the on-disk cache (remote, paid teachers: yes).
    """

    model_id: str
    cacheable: bool

    async def explain(self, image: Image.Image, score: float, metadata: dict[str, Any] | None) -> CallResult:
        """``image``: the RGB image the student sees; ``score``: true score 0-4; ``metadata``: degradation
        record of simulated data (or None). Returns a result with ``rationale`` set when ``ok``."""
        ...

    async def aclose(self) -> None: ...


class LLMTeacher:
    """A remote model as teacher: :func:`ctiqa.prompts.teacher_prompt`, ``TEACHER_SYSTEM`` and
    ``TEACHER_RESPONSE_SCHEMA`` sent through a client (:class:`GeminiClient` or :class:`OpenAICompatClient`)."""

    cacheable = True

    def __init__(self, client: GeminiClient | OpenAICompatClient, model_id: str | None = None) -> None:
        self.client = client
        self.model_id = model_id or client.model

    async def explain(self, image: Image.Image, score: float, metadata: dict[str, Any] | None = None) -> CallResult:
        from ctiqa.prompts import TEACHER_RESPONSE_SCHEMA, TEACHER_SYSTEM, teacher_prompt

        result = await self.client.generate(image, teacher_prompt(score), TEACHER_SYSTEM, TEACHER_RESPONSE_SCHEMA)
        if result.ok and not (result.rationale or "").strip():
            result.ok, result.error = False, "empty_answer: the JSON rationale is empty"
        return result

    async def aclose(self) -> None:
        await self.client.aclose()


class TemplateTeacher:
    """Offline teacher for SIMULATED data: writes a short rationale (about 30-60 words) from the known degradation.

    Noise wording follows the expected quantum-noise standard deviation of the level (``noise_sigma_hu`` from
    degradations.json, else ``9 HU / sqrt(dose_fraction * n_views / 1024)``, ctiqa.simulation's calibration),
    streak wording the number of projection views, edge and low-contrast wording and the verdict the score.
    Synonyms and sentence order are drawn from a RNG seeded by (``seed``, score, dose, views), so the text is
    reproducible but varied. Wording is anatomy-neutral (simulated base slices are head, chest, spine and
    abdomen) and never mentions artifacts the simulation does not make (metal, rings, motion, beam hardening).

    Thresholds, log-evenly spaced over the simulator's range (noise 9-114 HU, views 1024-64; design.md §4):
    noise sigma < 17 / 32 / 60 HU -> minimal / mild / moderate, else heavy; views >= 512 / 256 / 128 -> no /
    faint / moderate, else dense streaks. Score bands (LDCTIQA scale 0 bad ... 4 excellent): >= 3.5, >= 2.5,
    >= 1.5, else.

    Raises (from ``explain`` / ``write``):
        CTIQAError: ``metadata`` lacks ``dose_fraction`` or ``n_views``: real data needs a real teacher.
    """

    cacheable = False
    model_id = "ctiqa-template-v1"
    FULL_DOSE_NOISE_HU = 9.0  # ctiqa.simulation.FULL_DOSE_NOISE_HU

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    # (upper bound of noise sigma in HU, phrases)
    _NOISE = [
        (17.0, ["Image noise is minimal", "Noise is low and fine-grained", "Only faint quantum mottle is present"]),
        (32.0, ["Mild noise is visible", "A mild, fine noise texture is present", "Noise is mild but noticeable"]),
        (60.0, ["Moderate grainy noise is present", "Noise is moderate and grainy",
                "A moderate mottled noise texture is present"]),
        (float("inf"), ["Heavy coarse noise dominates", "Noise is heavy and coarse", "Strong grainy mottle is present"]),
    ]
    # (lower bound of views, phrases)
    _STREAK = [
        (512, ["no streak artifacts are seen", "there are no visible streaks", "streak artifacts are absent"]),
        (256, ["faint streaks cross the field", "faint thin streaks are seen", "subtle streaking is present"]),
        (128, ["moderate streaks radiate across the slice", "moderate streak artifacts cross the soft tissue",
               "streaking of moderate intensity is visible"]),
        (0, ["dense streaks radiate across the whole slice", "pronounced streak artifacts cross the image",
             "strong streaking overlies the anatomy"]),
    ]
    # (lower bound of score, edge phrases, low-contrast phrases)
    _EDGES = [
        (3.5, ["Organ and vessel edges are sharp", "Tissue margins and vessel walls are crisp"],
         ["low-contrast structures are well distinguished", "subtle density differences remain clear"]),
        (2.5, ["Organ edges are mostly sharp", "Tissue and vessel margins are largely preserved"],
         ["subtle low-contrast detail is slightly obscured", "low-contrast detectability is mildly reduced"]),
        (1.5, ["Organ edges are softened", "Tissue and vessel margins appear blurred"],
         ["low-contrast detectability is clearly reduced", "small low-contrast structures are hard to separate"]),
        (0.0, ["Organ edges are indistinct", "Tissue and vessel margins are largely lost"],
         ["low-contrast structures are obscured", "soft-tissue differences cannot be resolved"]),
    ]
    _VERDICT = [
        (3.5, ["Overall quality is excellent for diagnosis.", "The image is fully adequate for diagnostic reading."]),
        (2.5, ["Overall quality is good; diagnosis is only slightly limited.",
               "The image is diagnostic with minor limitations."]),
        (1.5, ["Overall quality is fair; confidence for subtle findings is reduced.",
               "The image is of limited diagnostic value for subtle findings."]),
        (0.0, ["Overall quality is poor and limits diagnostic use.", "The image is of poor diagnostic quality."]),
    ]
    _WHERE = ["in the soft tissue", "across the homogeneous soft-tissue regions", "over the soft tissue and fat"]

    def write(self, score: float, metadata: dict[str, Any] | None) -> str:
        """The rationale text (deterministic for the same inputs and seed).

        Raises:
            CTIQAError: missing ``dose_fraction`` / ``n_views``.
        """
        md = metadata or {}
        if md.get("dose_fraction") is None or md.get("n_views") is None:
            raise CTIQAError(
                "the template teacher writes rationales from the known degradation and needs degradations.json "
                "metadata (dose_fraction, n_views) for every image; this data has none (real LDCTIQA?): use "
                "--teacher gemini or --teacher openai")
        dose, views = float(md["dose_fraction"]), int(md["n_views"])
        sigma = md.get("noise_sigma_hu")
        sigma = float(sigma) if sigma is not None else self.FULL_DOSE_NOISE_HU / math.sqrt(dose * views / 1024)
        rng = random.Random(f"{self.seed}|{score:.3f}|{dose:.4f}|{views}")
        noise = rng.choice(next(p for hi, p in self._NOISE if sigma < hi))
        streak = rng.choice(next(p for lo, p in self._STREAK if views >= lo))
        _, edges, contrast = next(row for row in self._EDGES if score >= row[0] or row[0] == 0.0)
        verdict = rng.choice(next(p for lo, p in self._VERDICT if score >= lo or lo == 0.0))
        where = rng.choice(self._WHERE)
        s1 = f"{noise} {where}, and {streak}." if rng.random() < 0.5 else f"{noise} {where}; {streak}."
        s2 = f"{rng.choice(edges)}, and {rng.choice(contrast)}."
        body = [s1, s2] if rng.random() < 0.7 else [s2, s1]
        return " ".join([*body, verdict])

    async def explain(self, image: Image.Image, score: float, metadata: dict[str, Any] | None = None) -> CallResult:
        text = self.write(score, metadata)
        return CallResult(ok=True, text=text, parsed={"rationale": text, "score": float(score)},
                          finish_reason="STOP", model=self.model_id)

    async def aclose(self) -> None:
        return None


TEACHERS = ("gemini", "openai", "template")
DEFAULT_MODELS = {"gemini": "gemini-2.5-pro", "openai": None, "template": TemplateTeacher.model_id}


def make_teacher(name: str, *, model: str | None = None, base_url: str | None = None,
                 max_output_tokens: int | None = None, thinking_budget: int | None = 2048,
                 temperature: float | None = None, timeout_s: float = 300.0, retry: RetryPolicy | None = None,
                 seed: int = 0) -> Teacher:
    """Build a teacher from CLI names.

    Args:
        name: ``gemini``, ``openai`` or ``template``.
        model: model id (gemini default ``gemini-2.5-pro``; openai: required, the served model name).
        base_url: API root (required for ``openai``; optional for ``gemini``, e.g. a proxy or test server).
    Raises:
        TeacherConfigError: unknown name, missing model/base URL/API key.
    """
    if name == "template":
        return TemplateTeacher(seed=seed)
    if name == "gemini":
        client: GeminiClient | OpenAICompatClient = GeminiClient(
            model or DEFAULT_MODELS["gemini"], base_url=base_url, max_output_tokens=max_output_tokens or 8192,
            thinking_budget=thinking_budget, temperature=temperature, timeout_s=timeout_s, retry=retry)
        return LLMTeacher(client)
    if name == "openai":
        if not base_url or not model:
            raise TeacherConfigError("--teacher openai needs --base-url (e.g. http://localhost:8000/v1) and --model "
                                     "(the served model name)")
        client = OpenAICompatClient(model, base_url=base_url, max_output_tokens=max_output_tokens or 2048,
                                    temperature=temperature, timeout_s=timeout_s, retry=retry)
        return LLMTeacher(client)
    raise TeacherConfigError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")


def price_for(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for a known model id (longest matching prefix), else None."""
    best = None
    for key, price in PRICES_USD_PER_MTOK.items():
        if model.split("/")[-1].startswith(key) and (best is None or len(key) > len(best[0])):
            best = (key, price)
    return None if best is None else best[1]
