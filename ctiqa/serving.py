"""Scoring through an OpenAI-compatible inference server: ``ctiqa evaluate --server URL`` and ``ctiqa predict --server``.

Any server that speaks OpenAI chat completions works: vLLM (``vllm serve MODEL``: continuous batching, tensor and
data parallelism), ``transformers serve`` (extra ``ctiqa[serve]``), Ollama, llama.cpp. Each image is one request
through :class:`ctiqa.clients.OpenAICompatClient` (the teacher's client: retries with backoff, per-request
timeout), at most ``concurrency`` in flight, with exactly what the in-process path uses: the student instruction
(:func:`ctiqa.prompts.instruction`; the server's chat template wraps it as ``processor.apply_chat_template`` does
in-process), the rendered RGB image as a lossless PNG data URL, greedy decoding (temperature 0), the same answer
budget, and the same parser (:func:`ctiqa.scoring.parse_score_detailed`).

Probability score (``prob_score``; see :mod:`ctiqa.inference`): asked for when the format starts with the score.
The answer is requested with ``logprobs`` and the top :data:`LOGPROB_ALTERNATIVES` alternatives per token (vLLM's
default ``max_logprobs`` is 20). When the server returns them, the distribution over the digits ``0``-``4`` is read
at the token after ``Score: `` of the greedy answer (the same position and condition as the in-process forward
pass over ``prompt + "Score: "``), and the decimal distribution over ``0``-``9`` after each ``"d."`` (d = 0..3) from
four one-token requests that continue an answer prefix ``Score: d.`` (vLLM ``continue_final_message``); both are
renormalised over the digit tokens and combined by the same function as in-process
(:func:`ctiqa.inference.score_from_distributions`). Digits outside the top 20 count as probability 0 (they hold less
than the 20th alternative each). With ``score_only`` the answer is cut after :data:`SCORE_ONLY_TOKENS` tokens.
When the server returns no log-probabilities (``transformers serve`` ignores or refuses the fields), rows carry
parsed scores only (with ``score_only``: parsed from the short answer) and :meth:`ServerScorer.describe`
(``results.json`` provenance) says so.

Answer log: every final answer (not a timeout or a dropped connection) is appended to a JSONL file that belongs to
the run (``ctiqa evaluate``: :data:`ANSWERS_FILE` in ``--out``; ``ctiqa predict``: ``FILE.answers.jsonl`` beside
``--out FILE``), keyed by the image pixels, the server URL, the served model, the prompt and the request, and
flushed at once; a killed run asks again only what was in flight. It is never shared between runs: a server
re-deployed under the same model name (``vllm serve NEW --served-model-name ctiqa``) is asked afresh by a new run,
never answered from an earlier model's answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.imaging import image_sha256
from ctiqa.prompts import DEFAULT_TARGET_FORMAT, PROMPT_VERSION, instruction

#: Alternatives per token asked for with ``top_logprobs`` (vLLM's default ``--max-logprobs`` is 20).
LOGPROB_ALTERNATIVES = 20
#: Answer budget (tokens) of a score-only request: enough for ``Score: d.d`` in any tokenizer.
SCORE_ONLY_TOKENS = 8

def answered(res: Any) -> bool:
    """True when a call (:class:`ctiqa.clients.CallResult`) brought an answer back, which is then cached; a call
    that failed with no answer (HTTP error after the retries, timeout, lost connection) is not cached, so that a
    re-run asks again."""
    return not res.error or bool(res.text)


#: The answer log of ``ctiqa evaluate --server`` in its ``--out`` folder (module docstring).
ANSWERS_FILE = "server_answers.jsonl"


class AnswerLog:
    """Append-only JSONL cache of server answers: ``{"key": ..., "result": CallResult.to_dict()}`` per line, flushed
    and fsync'ed per answer. A last line cut short by a kill is ignored. One process per file at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.answers: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.answers[rec["key"]] = rec["result"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a")
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.answers.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        with self._lock:
            self.answers[key] = result
            self._fh.write(json.dumps({"key": key, "result": result}) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def _norm(token: str) -> str:
    return token.replace("\u2581", " ")  # SentencePiece's word-boundary mark, as some servers return it


def _digit_distribution(top: list[dict[str, Any]], lead: str = "") -> tuple[list[float], float, int]:
    """Probabilities of the digit tokens ``lead + d`` (d = 0..9) among top alternatives: (p[10], mass, n found)."""
    p = [0.0] * 10
    found = 0
    for alt in top:
        t = _norm(alt["token"])
        if len(t) == len(lead) + 1 and t.startswith(lead) and t[-1].isdigit() and p[int(t[-1])] == 0.0:
            p[int(t[-1])] = math.exp(alt["logprob"])
            found += 1
    return p, sum(p), found


def score_position(logprobs: list[dict[str, Any]]) -> tuple[int, str] | None:
    """Where the integer digit of ``Score: d.d`` is generated in an answer's tokens: (index, lead), ``lead`` being
    ``""`` when the digit is its own token after ``"Score: "`` and ``" "`` when the space is folded into it
    (``"Score:"`` then ``" d"``). None when the answer does not start with the score."""
    from ctiqa.inference import SCORE_PREFIX

    text = ""
    for i, tok in enumerate(logprobs):
        t = _norm(tok["token"])
        if text.lstrip() == SCORE_PREFIX and t[:1].isdigit():
            return i, ""
        if text.lstrip() == SCORE_PREFIX.rstrip() and t[:1] == " " and t[1:2].isdigit():
            return i, " "
        text += t
        if len(text.lstrip()) > len(SCORE_PREFIX):
            return None
    return None


class ServerScorer:
    """A scoring backend (:data:`ctiqa.predict.Backend`): RGB PIL images -> one dict per image with the keys of
    :class:`ctiqa.inference.ImagePrediction` plus ``error`` and ``finish_reason``. See the module docstring.

    Args:
        url: the server's API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added when missing).
        model: the served model name (vLLM: the path or ``--served-model-name``; ``transformers serve``: the model
            it was started with).
        fmt: the model's answer format. score_only: no rationale (see the module docstring).
        max_new_tokens: answer budget. concurrency: requests in flight (>= 1). timeout_s: per request, seconds.
        probability: ask for log-probabilities (score-first / score-only formats only).
        cache: the run's :class:`AnswerLog` file (module docstring), or None for none (every image is asked).
        retry: a :class:`ctiqa.clients.RetryPolicy` (default: its defaults).
    Raises:
        CTIQAError: concurrency < 1, or (from a call) ClientConfigError when the server refuses every request
            (unknown model, 401/403/404, nothing listening).
    """

    def __init__(self, url: str, model: str, *, fmt: str = DEFAULT_TARGET_FORMAT, score_only: bool = False,
                 max_new_tokens: int = 512, concurrency: int = 8, timeout_s: float = 300.0, probability: bool = True,
                 cache: str | os.PathLike | None = None, retry: Any = None) -> None:
        from ctiqa.clients import OpenAICompatClient, redact_url
        from ctiqa.inference import PROBABILITY_FORMATS

        if concurrency < 1:
            raise CTIQAError(f"--concurrency must be at least 1 (got {concurrency})")
        if not model:
            raise CTIQAError("--server needs --model: the name the server serves the model under")
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.shown_url = redact_url(self.url)  # what is printed and recorded: no user:password@ or ?token=
        self.model, self.fmt, self.score_only = model, fmt, score_only
        self.max_new_tokens, self.concurrency = max_new_tokens, concurrency
        want = probability and fmt in PROBABILITY_FORMATS
        self.logprobs: bool | None = None if want else False  # None: not known yet
        self.logprobs_note = None if want else f"not asked for (format {fmt} has no leading score)"
        self.prompt = instruction(fmt)
        self.client = OpenAICompatClient(model, base_url=self.url, max_output_tokens=max_new_tokens, temperature=0.0,
                                         timeout_s=timeout_s, retry=retry,
                                         top_logprobs=LOGPROB_ALTERNATIVES if want else None)
        self.cache = None if cache is None else AnswerLog(cache)
        self.stats: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="ctiqa-server-client")
        self._thread.start()
        self._sem: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------------------------------------ public
    def __call__(self, images: list[Any]) -> list[dict[str, Any]]:
        """Score ``images`` (RGB PIL); blocks until every answer is in. Order is kept."""
        return asyncio.run_coroutine_threadsafe(self._score_all(list(images)), self._loop).result()

    def describe(self) -> dict[str, Any]:
        """Provenance for ``results.json`` / ``FILE.run.json``: server, model, how the probability score was got."""
        how = (f"from the server's log-probabilities (top {LOGPROB_ALTERNATIVES}; answer + 4 decimal requests)"
               if self.logprobs else f"none: {self.logprobs_note or 'no request made yet'}")
        return {"server": self.shown_url, "served_model": self.model, "api": "openai-compatible",
                "temperature": 0.0, "probability_score": how, "logprobs": bool(self.logprobs),
                "concurrency": self.concurrency, "requests": dict(self.stats)}

    def close(self) -> None:
        """Close the HTTP client, the event loop thread and the cache file."""
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if self.cache is not None:
            self.cache.close()

    # ------------------------------------------------------------------------------------------------ internals
    async def _score_all(self, images: list[Any]) -> list[dict[str, Any]]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        if not images:
            return []
        first = [await self._score_one(images[0])] if self.logprobs is None else []  # learn what the server does
        rest = await asyncio.gather(*(self._score_one(im) for im in images[len(first):]))
        return first + list(rest)

    async def _ask(self, image: Any, sha: str, *, prefix: str | None = None, max_tokens: int) -> Any:
        from ctiqa.clients import CallResult

        top = self.client.top_logprobs
        key = hashlib.sha256(json.dumps([sha, self.shown_url, self.model, PROMPT_VERSION, self.prompt, prefix, max_tokens,
                                         top]).encode()).hexdigest()
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.stats["cached"] += 1
            return CallResult.from_dict(hit)
        assert self._sem is not None
        async with self._sem:
            res = await self.client.generate(image, self.prompt, prefix=prefix, max_tokens=max_tokens)
        self.stats["sent"] += 1
        if self.cache is not None and answered(res):
            self.cache.put(key, res.to_dict())
        return res

    async def _score_one(self, image: Any) -> dict[str, Any]:
        from ctiqa.inference import ImagePrediction, score_from_distributions
        from ctiqa.scoring import parse_score_detailed

        sha = await asyncio.to_thread(image_sha256, image)
        budget = SCORE_ONLY_TOKENS if self.score_only else self.max_new_tokens
        res = await self._ask(image, sha, max_tokens=budget)
        if self.client.top_logprobs and str(res.error).startswith(("http_400", "http_422")):
            # a request error when asking for log-probabilities: ask without them (an error that stays is real)
            self.logprobs, self.logprobs_note = False, f"the server refused them ({res.error[:120]})"
            self.client.top_logprobs = None
            res = await self._ask(image, sha, max_tokens=budget)
        if self.logprobs is None:
            self.logprobs = bool(res.logprobs)
            if not res.logprobs:
                self.logprobs_note = "the server returned no log-probabilities"
                if res.text is not None:  # answers came back without them: stop asking
                    self.client.top_logprobs = None
        pred = ImagePrediction()
        row: dict[str, Any] = {"error": res.error if res.error and not res.text else None,
                               "finish_reason": res.finish_reason}
        if not self.score_only or not self.logprobs:  # score-only without logprobs: parse the short answer
            text = (res.text or "").strip() or None
            parsed = parse_score_detailed(text)
            pred.text, pred.parsed_score, pred.parse_rule = text, parsed.value, parsed.rule
        if self.logprobs and res.logprobs and (pos := score_position(res.logprobs)) is not None:
            i, lead = pos
            p, mass, _ = _digit_distribution(res.logprobs[i]["top"], lead)
            p_int = p[:5]
            mass = sum(p_int)
            if mass > 0:
                decs = await asyncio.gather(*(self._ask(image, sha, prefix=f"Score: {d}.", max_tokens=1)
                                              for d in range(4)))
                p_dec, dec_mass = [], []
                for r in decs:
                    q, m, _ = _digit_distribution(r.logprobs[0]["top"]) if r.logprobs else ([0.0] * 10, 0.0, 0)
                    p_dec.append([x / m for x in q] if m > 0 else [0.1] * 10)
                    dec_mass.append(m)
                ps = score_from_distributions([x / mass for x in p_int], p_dec, mass, dec_mass)
                pred.prob_score, pred.prob_std, pred.prob_mass = ps.score, ps.std, ps.mass
                pred.prob_decimal_mass, pred.prob_digits = ps.decimal_mass, ps.p_digits
        return {**pred.to_dict(), **row}


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate_with_server(samples: list[Any], out: Path, scorer: ServerScorer, *, key: str,
                         batch_size: int = 32) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``ctiqa evaluate --server``: score every sample through ``scorer``, appending rows to
    ``out/predictions.jsonl`` per batch (a re-run with the same settings resumes; rows whose call timed out or
    lost the connection, or got an HTTP error, are asked again).

    Args:
        samples: :class:`ctiqa.evaluation.Sample` list (images loaded). key: the run key of the settings.
        batch_size: images handed to the scorer at once (its ``concurrency`` bounds the requests in flight).
    Returns:
        (records in sample order, provenance: :meth:`ServerScorer.describe` + timing and resumed rows).
    """
    from ctiqa.evaluation import PREDICTIONS_FILE, append_scored, load_done_rows

    path = out / PREDICTIONS_FILE
    done = load_done_rows(path, key, samples)
    todo = [s for s in samples if s.id not in done]
    info: dict[str, Any] = {"resumed_rows": len(samples) - len(todo)}
    if todo:
        info["seconds_per_image"] = append_scored(samples, todo, done, path, key, batch_size=batch_size,
                                                  desc=f"evaluate {scorer.model} @ {scorer.shown_url}",
                                                  score=lambda chunk: scorer([s.image for s in chunk]))
    info.update(scorer.describe())
    info["failed_calls"] = sum(1 for s in samples if done[s.id].get("error"))
    return [done[s.id] for s in samples], info


def evaluate_cli(args: Any, samples: list[Any], fmt: str, out: Path) -> dict[str, Any]:
    """The ``ctiqa evaluate --server URL --model NAME`` run: keyword arguments for
    :func:`ctiqa.evaluation.finish` (records, name, kind ``server``, settings, model_info).

    Raises:
        CTIQAError: ``--adapter`` or ``--teacher`` given with ``--server`` (serve a merged model: ``ctiqa export``).
    """
    from ctiqa.evaluation import run_key

    if getattr(args, "adapter", None):
        raise CTIQAError("--adapter cannot be sent to a server: merge it first (ctiqa export --adapter DIR --out "
                         "MERGED), serve MERGED and pass --model with its served name")
    if getattr(args, "teacher", None) or getattr(args, "api", None):
        raise CTIQAError("--server and --teacher/--api exclude each other")
    scorer = ServerScorer(args.server, args.model, fmt=fmt, score_only=args.score_only,
                          max_new_tokens=args.max_new_tokens, concurrency=args.concurrency, cache=out / ANSWERS_FILE)
    settings = {"source": "server", "server": scorer.shown_url, "model": args.model, "format": fmt,
                "prompt_version": PROMPT_VERSION,
                "decoding": {"temperature": 0.0, "max_new_tokens": args.max_new_tokens,
                             "generate": not args.score_only, "probability_score": True},
                "dataset": args.dataset, "split": args.split, "limit": args.limit}
    try:
        records, info = evaluate_with_server(samples, out, scorer, key=run_key(settings),
                                             batch_size=max(args.batch_size, 4 * args.concurrency))
    finally:
        scorer.close()
    return {"records": records, "name": args.name or f"{Path(args.model).name} (server)", "kind": "server",
            "settings": settings, "model_info": info}
