"""The teacher answer cache: an append-only JSONL file, one line per answer (success or failure).

Every answer is appended, flushed and fsync'ed as soon as it arrives, so a crash or ``kill -9`` loses at most
the requests in flight. Keys are content-addressed, so one cache can serve many runs and output folders::

    key = sha256(image pixels) | prompt version | teacher model | score

(the true score is part of the key because the teacher prompt contains it; a relabelled image is re-asked.)
A key is *finished* once any of its records is ``ok``; failed records are kept for the audit and retried by the
next run unless told otherwise. A last line cut short by a kill is dropped (and the file truncated to the last
complete line before appending); a bad line anywhere else is an error naming the file and line.

One process per cache file at a time (appends of long records from two processes could interleave); runs
that must not share a file pass ``--cache``.

Record fields: ``key``, ``image_sha256``, ``prompt_version``, ``teacher``, ``score``, ``id`` (LDCTIQA file stem;
no DICOM metadata ever), ``time`` (UTC ISO 8601) and the :class:`~ctiqa.clients.CallResult` fields.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.clients import CallResult


def complete_lines(path: Path, *, stacklevel: int = 2) -> list[tuple[int, str]]:
    """The non-blank complete lines of an append-only UTF-8 JSONL file, as ``(line number from 1, text)``.

    A last line cut short by a kill (no final newline) is dropped from the file (truncated, fsync'ed) with a
    warning, so the next append starts on a line of its own. A missing file has no lines.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        # Never cut a file that is not ours (a user's notes, a DICOM given as --cache): every complete line must be
        # a JSON object and the cut-short tail must start like one, else refuse with nothing changed.
        try:
            ours = data[complete:].lstrip()[:1] == b"{" and all(
                isinstance(json.loads(line), dict) for line in data[:complete].decode("utf-8").splitlines()
                if line.strip())
        except (UnicodeDecodeError, json.JSONDecodeError):
            ours = False
        if not ours:
            raise CTIQAError(f"{path}: not a ctiqa JSONL file (answer cache or batch job log); nothing was changed. "
                             "Give another --cache")
        warnings.warn(f"{path}: dropping an incomplete last line ({len(data) - complete} bytes; the previous run "
                      "was killed while writing it)", stacklevel=stacklevel)
        with open(path, "r+b") as f:
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    try:
        lines = enumerate(data[:complete].decode("utf-8").splitlines(), start=1)
    except UnicodeDecodeError as e:
        raise CTIQAError(f"{path}: not a ctiqa JSONL file ({e.reason} at byte {e.start}); give another --cache") from e
    return [(n, line) for n, line in lines if line.strip()]


def cache_key(sha: str, prompt_version: str, teacher: str, score: float) -> str:
    """The cache key string for one request (score written with 4 decimals)."""
    return f"{sha}|{prompt_version}|{teacher}|{float(score):.4f}"


def default_cache_path() -> Path:
    """``teacher_answers.jsonl`` in the ctiqa cache folder (:func:`ctiqa.paths.cache_home`; ``$CTIQA_CACHE_DIR``
    moves it). Outside any output folder on purpose: deleting or re-writing a dataset never deletes paid-for
    answers."""
    from ctiqa.paths import cache_path

    return cache_path("teacher_answers.jsonl")


class AnswerCache:
    """Append-only JSONL answer cache (see the module docstring).

    Args:
        path: the JSONL file (created with its folder when missing).
    Raises:
        CTIQAError: a line other than the last is not valid JSON or lacks ``key``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._load()
        self._fh = None

    def _load(self) -> None:
        for lineno, line in complete_lines(self.path, stacklevel=4):
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (ValueError, KeyError, TypeError) as e:
                raise CTIQAError(f"{self.path}, line {lineno}: not a cache record ({e}); move the file away or "
                                 "fix that line") from e
            self.records.setdefault(key, []).append(rec)

    def finished(self, key: str) -> dict[str, Any] | None:
        """The latest successful record for ``key``, or None."""
        for rec in reversed(self.records.get(key, [])):
            if rec.get("ok"):
                return rec
        return None

    def last(self, key: str) -> dict[str, Any] | None:
        """The latest record for ``key`` (success or failure), or None."""
        recs = self.records.get(key)
        return recs[-1] if recs else None

    def append(self, key: str, result: CallResult, **fields: Any) -> dict[str, Any]:
        """Append one answer durably (write, flush, fsync) and return the stored record."""
        rec = {"key": key, **fields, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               **result.to_dict()}
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records.setdefault(key, []).append(rec)
        return rec

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def result_of(record: dict[str, Any]) -> CallResult:
        """Rebuild the :class:`CallResult` stored in a record."""
        return CallResult.from_dict(record)
