"""Gemini Batch Mode for the teacher (``ctiqa build-dataset --teacher gemini --batch``).

The Batch API answers within 24 h at half the synchronous price (:data:`ctiqa.clients.BATCH_PRICE_FACTOR`;
ai.google.dev/gemini-api/docs/batch-mode). One run:

1. The images still to ask (not finished in the answer cache, not in an open job) become inline requests
   (:meth:`ctiqa.clients.GeminiClient.inline_request`: the same prompt, system text, schema and PNG as a
   synchronous call), packed into jobs of at most :data:`MAX_JOB_BYTES` (the API's 20 MB request limit).
2. Each job is recorded in the **job log** before and after it is created (``submitting`` with a random display
   name and the requests' keys, then ``submitted`` with the job's name), appended and fsync'ed like the answer
   cache, next to it (:func:`job_log_path`). A run killed at any point is resumed by the next one: open jobs are
   polled, never submitted again (a job whose ``submitted`` line was lost is found again by its display name).
3. Open jobs are polled every ``poll_s`` seconds until they end. A succeeded job's answers are checked like
   synchronous ones (:meth:`LLMTeacher.accept`) and appended to the same answer cache (``batch: true``); a failed,
   cancelled or expired job records a ``batch_error`` for each of its requests (asked again by the next run).
   Then the job is closed in the log (``done``).

Stopping the builder while it waits is safe; the job keeps running at Google and the next run picks it up.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.clients import GEMINI_INLINE_LIMIT_BYTES, CallResult, GeminiClient

from .cache import complete_lines

#: Bytes of inline requests per job: the request limit (20 MB) less room for the JSON around the images.
MAX_JOB_BYTES = GEMINI_INLINE_LIMIT_BYTES - 2_000_000
#: Terminal job states (``google.genai.types.JobState`` names).
SUCCEEDED = "JOB_STATE_SUCCEEDED"
ENDED = (SUCCEEDED, "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")


def job_log_path(cache_path: Path) -> Path:
    """The job log beside an answer cache: ``teacher_answers.jsonl`` -> ``teacher_answers.batches.jsonl``."""
    return cache_path.with_name(cache_path.stem + ".batches.jsonl")


@dataclass
class Job:
    """One Batch API job as the log knows it: ``requests`` are ``{key, id, image_sha256, score, prompt_version,
    teacher}`` (the answer-cache fields) in request order; ``name`` is None until the job was created."""

    display_name: str
    requests: list[dict[str, Any]]
    name: str | None = None
    done: bool = False
    state: str = ""


@dataclass
class JobLog:
    """The append-only job log (module docstring). A last line cut short by a kill is ignored.

    Raises:
        CTIQAError: a line other than the last is not JSON.
    """

    path: Path
    jobs: dict[str, Job] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for lineno, line in complete_lines(self.path, stacklevel=4):
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                raise CTIQAError(f"{self.path}, line {lineno}: not a batch job record ({e})") from e

    def _apply(self, rec: dict[str, Any]) -> None:
        event, dn = rec["event"], rec["display_name"]
        if event == "submitting":
            self.jobs[dn] = Job(dn, list(rec["requests"]))
        elif event == "submitted":
            self.jobs[dn].name = rec["name"]
        elif event == "done":
            self.jobs[dn].done, self.jobs[dn].state = True, rec.get("state", "")

    def append(self, event: str, display_name: str, **fields: Any) -> None:
        """Append one event durably (write, flush, fsync) and apply it."""
        rec = {"event": event, "display_name": display_name,
               "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._apply(rec)

    def open_jobs(self) -> list[Job]:
        """Jobs not yet closed, in submission order."""
        return [j for j in self.jobs.values() if not j.done]


def pack_jobs(items: list[Any], max_bytes: int = MAX_JOB_BYTES) -> list[list[Any]]:
    """Consecutive groups of items whose base64 PNG bytes (4/3 of ``item.png``) plus 4 kB each stay below
    ``max_bytes`` (a single larger item is its own group)."""
    out: list[list[Any]] = []
    size = 0
    for it in items:
        n = len(it.png) * 4 // 3 + 4096
        if not out or size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(it)
        size += n
    return out


async def run_batches(todo: list[Any], teacher: Any, log: JobLog, *, record: Callable[[str, CallResult,
                      dict[str, Any]], None], fields: Callable[[Any], dict[str, Any]], poll_s: float = 30.0,
                      max_job_bytes: int = MAX_JOB_BYTES, progress: bool = True) -> None:
    """Ask ``teacher`` (an :class:`~datasets_builder.teachers.LLMTeacher` over a :class:`GeminiClient`) for every
    item of ``todo`` through the Batch API, resuming the open jobs of ``log`` first.

    Args:
        todo: items (``key``, ``png``, ``score``, ``metadata``) still to ask.
        record: ``record(key, result, cache_fields)`` stores one answer (the builder appends it to the cache).
        fields: the answer-cache fields of an item (``key``, ``id``, ``image_sha256``, ``score``, ...).
        poll_s: seconds between polls of open jobs.
    Raises:
        CTIQAError: the teacher is not a Gemini teacher; fatal API errors (bad key, unknown model, quota 0).
    """
    client = getattr(teacher, "client", None)
    if not isinstance(client, GeminiClient):
        raise CTIQAError("--batch needs --teacher gemini (the Gemini Batch API)")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    for job in log.open_jobs():
        if job.name is None:  # killed between "submitting" and "submitted": did the job get created?
            name = await client.find_batch(job.display_name)
            if name is None:
                log.append("done", job.display_name, state="NOT_CREATED")
            else:
                log.append("submitted", job.display_name, name=name)
    in_jobs = {r["key"] for j in log.open_jobs() for r in j.requests}
    new = [it for it in todo if it.key not in in_jobs]
    if len(todo) > len(new):
        say(f"batch: {len(todo) - len(new)} request(s) already in open jobs (recorded in {log.path})")
    for group in pack_jobs(new, max_job_bytes):
        dn = f"ctiqa-{uuid.uuid4().hex[:16]}"
        log.append("submitting", dn, model=client.model, requests=[fields(it) for it in group])
        reqs = []
        for it in group:
            r = teacher.request(it.score, it.metadata)
            reqs.append(client.inline_request(it.png, r.prompt, r.system, r.schema, key=it.key))
        name = await client.submit_batch(reqs, dn)
        log.append("submitted", dn, name=name)
        say(f"batch: submitted {name} ({len(group)} requests; the job is recorded in {log.path})")

    last: dict[str, str] = {}
    said_wait = False
    while open_jobs := log.open_jobs():
        for job in open_jobs:
            assert job.name is not None
            remote = await client.get_batch(job.name)
            state = getattr(remote.state, "name", None) or str(remote.state)
            if last.get(job.name) != state:
                say(f"batch: {job.name} {state} ({len(job.requests)} requests)")
                last[job.name] = state
            if state not in ENDED:
                continue
            by_key = {r["key"]: r for r in job.requests}
            answered = set()
            if state == SUCCEEDED:
                schema = teacher.request(2.0).schema
                for pos, (key, res) in enumerate(client.batch_results(remote, schema)):
                    req = by_key.get(key) if key is not None else (
                        job.requests[pos] if pos < len(job.requests) else None)
                    if req is not None and req["key"] not in answered:
                        record(req["key"], teacher.accept(res), req)
                        answered.add(req["key"])
            err = getattr(remote, "error", None)
            for req in job.requests:
                if req["key"] not in answered:
                    detail = f"job {job.name} ended {state}" + (f": {getattr(err, 'message', err)}" if err else
                                                                 "" if state != SUCCEEDED else ": no answer")
                    record(req["key"], CallResult(ok=False, error=f"batch_error: {detail}"[:300],
                                                  model=client.model, batch=True), req)
            log.append("done", job.display_name, name=job.name, state=state, answered=len(answered))
        if log.open_jobs():
            if not said_wait:
                say(f"batch: waiting for {len(log.open_jobs())} job(s), polling every {poll_s:g} s. Stopping is "
                    "safe: a re-run resumes the same job(s).")
                said_wait = True
            await asyncio.sleep(poll_s)
