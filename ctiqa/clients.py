"""API clients for remote vision-language models: one image + one prompt -> :class:`CallResult`.

Shared by the dataset builder's teachers (:mod:`datasets_builder.teachers`), the zero-shot API baselines of the
evaluation (:mod:`ctiqa.evaluation`) and serving. Two clients with one async method each,
``generate(image, prompt, system=None, schema=None) -> CallResult``:

* :class:`GeminiClient` (google-genai SDK; also the Gemini Batch API: :meth:`GeminiClient.inline_request`,
  :meth:`GeminiClient.submit_batch`, :meth:`GeminiClient.get_batch`, :meth:`GeminiClient.batch_results`);
* :class:`OpenAICompatClient` (any OpenAI-compatible chat server: vLLM, Ollama, llama.cpp; optional token
  log-probabilities).

Each sends one RGB image (PNG bytes) and one text prompt, retries transient errors (429, 5xx, timeouts, dropped
connections) with exponential backoff that honours the server's own retry delay (:class:`RetryPolicy`), and
turns every other outcome into a :class:`CallResult` that either holds a usable answer (``ok``) or says why not
(``error``). A result is ``ok`` only when the finish reason is STOP (OpenAI: ``stop``), the text is not empty
and, when a JSON schema was given, the text parses as JSON and validates against it (``jsonschema``). It never
raises for a per-request problem; it raises :class:`ClientConfigError` (a :class:`ctiqa.CTIQAError`) only for
problems that would fail every request: no API key, 401/403/404, an invalid key, a hard quota of zero
(429 "limit: 0"), a server that refuses connections (after :attr:`RetryPolicy.max_connect_attempts` tries).

Failure reasons (``CallResult.error`` starts with one of these codes, then ``": detail"``):
``blocked_prompt`` (no candidates; ``prompt_feedback.block_reason``), ``no_candidates``, ``finish_reason``
(MAX_TOKENS, SAFETY, RECITATION, ... / OpenAI ``length``, ``content_filter``), ``empty_answer``,
``invalid_json``, ``schema_mismatch``, ``request_too_large``, ``http_<status>`` (non-retryable status, or a
retryable one after the last attempt), ``timeout``, ``connection_error``, ``batch_error`` (a Batch API item).

Costs: :data:`PRICES_USD_PER_MTOK`, :func:`price_for`, :data:`BATCH_PRICE_FACTOR`, :meth:`Usage.cost_usd`.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import os
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

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
#: Gemini Batch API price as a share of the synchronous price: "50% of the standard cost"
#: (ai.google.dev/gemini-api/docs/batch-mode, checked 2025-07).
BATCH_PRICE_FACTOR = 0.5



#: user:password@ and ?query of a URL (where credentials ride): never printed or written (:func:`redact_url`).
_URL_SECRETS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#]*@)?(?P<rest>[^\s?#]*)"
                          r"(?P<query>\?[^\s#]*)?")


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it removed: ``http://user:pw@host:8000/v1?token=x`` ->
    ``http://***@host:8000/v1?***`` (user info and query string; host, port and path stay, so a log still says
    which server). For every URL ctiqa prints or records (results.json, run settings, progress bars, errors)."""
    return _URL_SECRETS.sub(lambda m: m["scheme"] + ("***@" if m["userinfo"] else "") + m["rest"]
                            + ("?***" if m["query"] else ""), text)


#: Environment variables whose values are secrets (API keys, Hub tokens): never written (:func:`redact_secrets`).
SECRET_ENV_VARS = ("OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
#: What a secret found in a server's answer is replaced with (the rationale audit rejects an answer holding it).
REDACTED = "<redacted secret>"


def redact_secrets(value: Any) -> Any:
    """``value`` (a string, or a JSON-like dict/list of them) with the value of every :data:`SECRET_ENV_VARS`
    variable that is set (8 characters or more) replaced by :data:`REDACTED`, and its base64 forms (of the key and
    of ``Bearer <key>``) and any 16 characters in a row of it too. A server that echoes its
    ``Authorization`` header, or a teacher that repeats a key from its context, must not put it into the answer
    cache, a dataset or a Hub upload."""
    import base64

    found = [v for v in (os.environ.get(k, "") for k in SECRET_ENV_VARS) if len(v) >= 8]
    if not found:
        return value
    secrets: set[str] = set()
    for sec in found:  # the key, its base64 forms (an echoed header), and every 16-character run of it (a cut echo)
        secrets |= {sec, *(base64.b64encode(x.encode()).decode().rstrip("=") for x in (sec, f"Bearer {sec}"))}
        secrets |= {sec[i:i + 16] for i in range(len(sec) - 15)}
    secrets_sorted = sorted(secrets, key=len, reverse=True)  # longest first: a whole key is one redaction

    def clean(v: Any) -> Any:
        if isinstance(v, str):
            for sec in secrets_sorted:
                v = v.replace(sec, REDACTED)
            return v
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(value)


class ClientConfigError(CTIQAError):
    """A problem that would fail every request of a run: no API key; 401/403/404; an invalid key; a hard quota of
    zero (429 "limit: 0"); a server that refuses connections. The message says what to check."""


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
        batch: True when the answer came from the Gemini Batch API (billed at :data:`BATCH_PRICE_FACTOR`).
        logprobs: per generated token ``{"token": str, "logprob": float, "top": [{"token", "logprob"}, ...]}``
            (natural log) when asked for (:class:`OpenAICompatClient` ``top_logprobs``), else None.
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
    batch: bool = False
    logprobs: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:  # every answer, new or read from a cache, loses any secret it echoes
        self.text, self.parsed, self.error = (redact_secrets(v) for v in (self.text, self.parsed, self.error))

    @property
    def reason(self) -> str | None:
        """The failure code (``error`` up to the first ``:``), None on success."""
        return None if self.error is None else self.error.split(":", 1)[0]

    @property
    def rationale(self) -> str | None:
        """``parsed["rationale"]`` when present (teacher answers), else None."""
        value = (self.parsed or {}).get("rationale")
        return value if isinstance(value, str) else None

    def cost_usd(self, price: tuple[float, float]) -> float:
        """Estimated cost in USD at ``price`` = (input, output) USD per 1M tokens, halved for batch answers."""
        return self.usage.cost_usd(*price) * (BATCH_PRICE_FACTOR if self.batch else 1.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the answer cache's record fields)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CallResult:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
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


def schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    """Problems of ``value`` against the JSON Schema ``schema`` (``jsonschema``, the draft the schema declares,
    else 2020-12), as ``"$.path: message"`` strings; empty when valid."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return [f"{e.json_path}: {e.message}" for e in sorted(cls(schema).iter_errors(value), key=lambda e: e.json_path)]


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


def is_unreachable(exc: BaseException) -> bool:
    """True when the server could not be reached at all: a refused connection or an unknown host name anywhere in
    the exception chain (aiohttp ``ClientConnectorError`` and openai ``APIConnectionError`` wrap the OS error)."""
    seen: set[int] = set()
    x: BaseException | None = exc
    while x is not None and id(x) not in seen:
        if isinstance(x, (ConnectionRefusedError, socket.gaierror)):
            return True
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    return False


def _message_of(exc: BaseException) -> str:
    return f"{getattr(exc, 'message', '') or ''} {getattr(exc, 'details', '') or ''} {exc}"


#: A 429 whose quota is zero ("Quota exceeded for metric: ..., limit: 0, model: gemini-2.5-pro": a free-tier key
#: for a model the free tier does not include) fails every retry: it is fatal, with the server's message.
_HARD_QUOTA = re.compile(r"\blimit:\s*0\b")


def is_fatal(exc: BaseException) -> bool:
    """True for errors that would fail every request: :data:`FATAL_STATUS`, a 400 for an invalid API key, a 429
    with a hard quota of zero (``"limit: 0"`` in the message)."""
    status = status_of(exc)
    if status in FATAL_STATUS:
        return True
    text = _message_of(exc)
    if status == 429:
        return bool(_HARD_QUOTA.search(text))
    return status == 400 and ("API_KEY_INVALID" in text or "API key not valid" in text)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: statuses in :data:`RETRYABLE_STATUS` (unless :func:`is_fatal`), timeouts,
    dropped or refused connections."""
    status = status_of(exc)
    if status is not None:
        return status in RETRYABLE_STATUS and not is_fatal(exc)
    return isinstance(exc, _TRANSIENT)


@dataclass
class RetryPolicy:
    """Exponential backoff for transient errors.

    Wait before retry n (n = 1, 2, ...) is ``min(max_delay, initial_delay * 2**(n-1)) + uniform(0, jitter)``,
    raised to the server's requested delay (:func:`server_retry_delay`, capped at ``max_server_delay``).
    Defaults follow google-genai's (5 attempts, 1 s initial, 60 s max) with one more attempt, because paid
    batch runs meet rate limits often. A server that refuses connections (:func:`is_unreachable`) gets only
    ``max_connect_attempts`` tries, then the run stops (:class:`ClientConfigError`). All delays in seconds.
    """

    max_attempts: int = 6
    initial_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 1.0
    max_server_delay: float = 600.0
    max_connect_attempts: int = 2

    def wait(self, retry_state: tenacity.RetryCallState) -> float:
        """Seconds to wait before the next attempt (a tenacity ``wait`` callable)."""
        n = retry_state.attempt_number
        base = min(self.max_delay, self.initial_delay * 2 ** (n - 1)) + random.uniform(0, self.jitter)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        server = server_retry_delay(exc) if exc is not None else None
        return base if server is None else max(base, min(server, self.max_server_delay))

    def stop(self, retry_state: tenacity.RetryCallState) -> bool:
        """Whether to give up after this attempt (a tenacity ``stop`` callable)."""
        n = retry_state.attempt_number
        if n >= max(1, self.max_attempts):
            return True
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return exc is not None and is_unreachable(exc) and n >= max(1, self.max_connect_attempts)


def _error_result(exc: BaseException, model: str) -> CallResult:
    status = status_of(exc)
    if status is not None:
        msg = getattr(exc, "message", None) or str(exc)
        return CallResult(ok=False, error=f"http_{status}: {str(msg)[:300]}", model=model)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in type(exc).__name__:
        return CallResult(ok=False, error=f"timeout: {type(exc).__name__}", model=model)
    return CallResult(ok=False, error=f"connection_error: {type(exc).__name__}: {str(exc)[:200]}", model=model)


async def call_with_retries(send: Callable[[], Awaitable[CallResult]], policy: RetryPolicy, model: str,
                            fatal_hint: str) -> CallResult:
    """Run ``await send()`` (returns a :class:`CallResult`) with ``policy``; exceptions become failed results.

    Raises:
        ClientConfigError: :func:`is_fatal` errors (401/403/404, invalid key, 429 with "limit: 0"), or a server
            that refused ``policy.max_connect_attempts`` connections in a row; ``fatal_hint`` says what to check.
    """
    t0 = time.perf_counter()
    retrying = tenacity.AsyncRetrying(stop=policy.stop, wait=policy.wait,
                                      retry=tenacity.retry_if_exception(is_transient), reraise=True)
    attempts = 0
    try:
        async for attempt in retrying:
            with attempt:
                attempts = attempt.retry_state.attempt_number
                result = await send()
    except Exception as exc:  # noqa: BLE001 - every per-request failure becomes a recorded result
        if is_fatal(exc):
            raise ClientConfigError(f"{model}: the server refused the request ({str(exc)[:500]}); {fatal_hint}") \
                from exc
        if is_unreachable(exc):
            raise ClientConfigError(f"{model}: cannot reach the server ({type(exc).__name__}: {str(exc)[:200]}; "
                                    f"{attempts} tries); {fatal_hint}") from exc
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
        ClientConfigError: no API key.
    """

    def __init__(self, model: str = "gemini-2.5-pro", *, api_key: str | None = None, base_url: str | None = None,
                 max_output_tokens: int = 8192, thinking_budget: int | None = 2048,
                 temperature: float | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy | None = None) -> None:
        from google import genai
        from google.genai import types

        key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not key:
            raise ClientConfigError("the gemini teacher needs an API key: set GEMINI_API_KEY in the environment")
        self.model = model
        self.base_url = base_url
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

    def _config(self, system: str | None, schema: dict[str, Any] | None) -> Any:
        t = self._types
        return t.GenerateContentConfig(
            system_instruction=system,
            max_output_tokens=self.max_output_tokens,
            temperature=self.temperature,
            thinking_config=None if self.thinking_budget is None else t.ThinkingConfig(
                thinking_budget=self.thinking_budget),
            response_mime_type="application/json" if schema is not None else None,
            response_schema=schema,
        )

    @property
    def _hint(self) -> str:
        return ("check GEMINI_API_KEY, your access to the model, --model and the network"
                + (f" (--base-url {redact_url(self.base_url)})" if self.base_url else ""))

    async def generate(self, image: Image.Image, prompt: str, system: str | None = None,
                       schema: dict[str, Any] | None = None) -> CallResult:
        """One image + prompt -> :class:`CallResult`. JSON mode (``response_schema``) when ``schema`` is given."""
        t = self._types
        data = await asyncio.to_thread(png_bytes, image)  # zlib releases the GIL: encode off the event loop
        if len(data) > _MAX_INLINE_PNG_BYTES:
            return CallResult(ok=False, error=f"request_too_large: PNG is {len(data)} bytes; the inline request "
                              f"limit is {GEMINI_INLINE_LIMIT_BYTES} bytes after base64", model=self.model)
        config = self._config(system, schema)
        contents = [t.Part.from_bytes(data=data, mime_type="image/png"), prompt]

        async def send() -> CallResult:
            resp = await self._client.aio.models.generate_content(model=self.model, contents=contents, config=config)
            return self._to_result(resp, schema)

        return await call_with_retries(send, self.retry, self.model, self._hint)

    # ----------------------------------------------------------------------------------- Batch API
    def inline_request(self, png: bytes, prompt: str, system: str | None = None,
                       schema: dict[str, Any] | None = None, key: str | None = None) -> Any:
        """One request of a Batch API job (``google.genai.types.InlinedRequest``): the same contents and config as
        :meth:`generate`; ``key`` travels in the request's ``metadata`` and comes back with its answer."""
        t = self._types
        return t.InlinedRequest(contents=[t.Content(role="user", parts=[
            t.Part.from_bytes(data=png, mime_type="image/png"), t.Part.from_text(text=prompt)])],
            config=self._config(system, schema), metadata=None if key is None else {"key": key})

    async def submit_batch(self, requests: list[Any], display_name: str) -> str:
        """Create a Batch API job (``POST models/{model}:batchGenerateContent`` with inline requests) and return
        its name (``batches/...``). Inline requests must stay below :data:`GEMINI_INLINE_LIMIT_BYTES` in all.

        Not retried blindly (a retry after a lost answer would pay twice): after a transient failure the job
        list is searched for ``display_name`` before the next attempt.

        Raises:
            ClientConfigError: fatal errors (see :func:`call_with_retries`).
        """
        t = self._types
        for attempt in range(1, max(1, self.retry.max_attempts) + 1):
            try:
                job = await self._client.aio.batches.create(
                    model=self.model, src=requests, config=t.CreateBatchJobConfig(display_name=display_name))
                return str(job.name)
            except Exception as exc:  # noqa: BLE001
                if is_fatal(exc) or (is_unreachable(exc) and attempt >= min(self.retry.max_connect_attempts,
                                                                            self.retry.max_attempts)):
                    raise self._as_config_error(exc) from exc
                if not is_transient(exc):
                    raise
                if attempt >= self.retry.max_attempts:  # the job log says "submitting": a re-run looks for it first
                    raise ClientConfigError(f"{self.model}: the batch job could not be created ({type(exc).__name__}: "
                                            f"{str(exc)[:300]}; {attempt} tries); run the same command again: it "
                                            "looks for the job before submitting it again") from exc
                found = await self.find_batch(display_name)
                if found is not None:
                    return found
                await asyncio.sleep(min(self.retry.max_delay, self.retry.initial_delay * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")  # pragma: no cover

    async def find_batch(self, display_name: str) -> str | None:
        """The name of a Batch API job with ``display_name`` (the newest first), or None."""
        pager = await self._retrying(lambda: self._client.aio.batches.list())
        async for job in pager:
            if job.display_name == display_name:
                return str(job.name)
        return None

    async def get_batch(self, name: str) -> Any:
        """The Batch API job ``name`` (``google.genai.types.BatchJob``: ``state.name`` is ``JOB_STATE_PENDING``,
        ``..._RUNNING``, ``..._SUCCEEDED``, ``..._FAILED``, ``..._CANCELLED`` or ``..._EXPIRED``), with retries."""
        return await self._retrying(lambda: self._client.aio.batches.get(name=name))

    def batch_results(self, job: Any, schema: dict[str, Any] | None = None) -> list[tuple[str | None, CallResult]]:
        """``(key, result)`` for every answer of a finished job, in request order (``key`` from the request's
        metadata, None when absent). A per-request error becomes ``batch_error: ...``; results are ``batch``."""
        out: list[tuple[str | None, CallResult]] = []
        for r in (job.dest.inlined_responses if job.dest is not None else None) or []:
            if r.response is not None:
                res = self._to_result(r.response, schema)
            else:
                err = r.error
                res = CallResult(ok=False, error=f"batch_error: {getattr(err, 'code', '')} "
                                 f"{getattr(err, 'message', err)}"[:300])
            res.model, res.batch = self.model, True
            out.append(((r.metadata or {}).get("key"), res))
        return out

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async for attempt in tenacity.AsyncRetrying(stop=self.retry.stop, wait=self.retry.wait, reraise=True,
                                                        retry=tenacity.retry_if_exception(is_transient)):
                with attempt:
                    return await call()
        except Exception as exc:
            if is_fatal(exc) or is_unreachable(exc):
                raise self._as_config_error(exc) from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _as_config_error(self, exc: BaseException) -> ClientConfigError:
        what = "cannot reach the server" if is_unreachable(exc) else "the server refused the request"
        return ClientConfigError(f"{self.model}: {what} ({str(exc)[:500]}); {self._hint}")

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


def _token_logprobs(choice: Any) -> list[dict[str, Any]] | None:
    """OpenAI ``choice.logprobs.content`` -> ``[{"token", "logprob", "top": [{"token", "logprob"}]}]`` or None."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [{"token": t.token, "logprob": float(t.logprob),
             "top": [{"token": a.token, "logprob": float(a.logprob)} for a in (t.top_logprobs or [])]}
            for t in content]


class OpenAICompatClient:
    """Async client for any OpenAI-compatible chat server (vLLM, Ollama, llama.cpp server), same interface as
    :class:`GeminiClient`. The image travels as a ``data:image/png;base64`` URL; JSON mode uses
    ``response_format={"type": "json_schema", ...}``.

    Args:
        model: the served model name.
        base_url: e.g. ``http://localhost:8000/v1`` (vLLM) or ``http://localhost:11434/v1`` (Ollama).
        api_key: defaults to ``$OPENAI_API_KEY``, else a dummy (local servers usually need none).
        max_output_tokens, temperature, timeout_s, retry: as for :class:`GeminiClient`.
        top_logprobs: when set (0-20), ask for token log-probabilities with that many alternatives per token
            (``logprobs=True, top_logprobs=N``); they come back in :attr:`CallResult.logprobs`.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 max_output_tokens: int = 2048, temperature: float | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy | None = None, top_logprobs: int | None = None) -> None:
        import openai

        self.model = model
        self.base_url = base_url
        self.top_logprobs = top_logprobs
        self.max_output_tokens = max_output_tokens
        self.temperature = temperature
        self.retry = retry or RetryPolicy()
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY")
                                          or "not-needed", timeout=timeout_s, max_retries=0)

    async def generate(self, image: Image.Image, prompt: str, system: str | None = None,
                       schema: dict[str, Any] | None = None, *, prefix: str | None = None,
                       max_tokens: int | None = None) -> CallResult:
        """One image + prompt -> :class:`CallResult`.

        Args:
            prefix: the start of the answer, continued by the model (vLLM's ``continue_final_message``: the
                rendered prompt ends with ``prefix`` instead of a closed assistant turn; other servers may refuse
                it). max_tokens: answer budget of this call (default ``max_output_tokens``).
        """
        import base64

        url = "data:image/png;base64," + base64.b64encode(await asyncio.to_thread(png_bytes, image)).decode("ascii")
        messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": prompt}]})
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages,
                                  "max_tokens": max_tokens or self.max_output_tokens}
        if prefix is not None:
            messages.append({"role": "assistant", "content": prefix})
            kwargs["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "answer", "schema": schema}}
        if self.top_logprobs is not None:
            kwargs |= {"logprobs": True, "top_logprobs": self.top_logprobs}

        async def send() -> CallResult:
            resp = await self._client.chat.completions.create(**kwargs)
            if not hasattr(resp, "choices"):  # the openai client returns a 200 body it cannot parse as text
                return CallResult(ok=False, model=self.model, error="invalid_response: the server answered 200 with "
                                  f"something that is not a chat completion ({str(resp)[:80]!r}); is --base-url the "
                                  "API root (…/v1)?")
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
                              error=error, usage=usage, logprobs=_token_logprobs(choice))

        return await call_with_retries(send, self.retry, self.model,
                                       f"check that the server at {redact_url(self.base_url)} is running, --model and "
                                       "OPENAI_API_KEY")

    async def aclose(self) -> None:
        await self._client.close()




def price_for(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for a known model id (longest matching prefix), else None."""
    best = None
    for key, price in PRICES_USD_PER_MTOK.items():
        if model.split("/")[-1].startswith(key) and (best is None or len(key) > len(best[0])):
            best = (key, price)
    return None if best is None else best[1]
