"""``ctiqa build-dataset``: LDCTIQA (or a simulated mini-LDCTIQA) + a teacher -> chat-format DatasetDict.

Steps, top to bottom:

1. Read the data (:func:`ctiqa.ldctiqa.load_ldctiqa`), split it (:func:`ctiqa.ldctiqa.split_ids`), render every
   image once with :func:`ctiqa.imaging.render` (the student's exact pixels) and PNG-encode it.
2. Ask the teacher for a rationale for every train/validation image (test too with ``--test-rationales``; the
   paper needs none for evaluation, and skipping them saves a tenth of the cost; ``--format score-only`` asks
   no teacher at all). Remote answers go through the :class:`~datasets_builder.cache.AnswerCache`: finished
   items are never asked again, also after ``kill -9``; failed ones are asked again unless
   ``--no-retry-failed``.
   With ``--batch`` (Gemini) the requests go through the Batch API at half the price
   (:mod:`datasets_builder.batch`): jobs are recorded beside the cache and resumed by a re-run.
3. Check every rationale (:mod:`datasets_builder.checks`); rows whose request failed or whose rationale was
   rejected are left out and listed in ``audit.csv``. A split left without rows ends the build (exit 1) with a
   failure summary, writing nothing.
4. Build the ``DatasetDict`` (schema: notes/common.md) and publish it through the public ``datasets`` /
   ``huggingface_hub`` API: ``--out DIR`` writes the Hub's layout (``data/<split>-0000i-of-0000N.parquet`` by
   ``Dataset.to_parquet``, ``README.md``, ``audit.csv``) that ``load_dataset(DIR)`` reads, into a new or empty
   folder or one an earlier build with the same settings wrote (never over someone else's files; a build with
   other settings is refused before any work unless ``--overwrite``, which moves it aside); ``--push-to-hub`` calls
   ``DatasetDict.push_to_hub`` and commits the card and ``audit.csv`` beside the data.

Memory: the PNG bytes of all images stay in memory (about 0.3 GB per 1,000 LDCTIQA 512x512 slices).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ctiqa import CTIQAError
from ctiqa.clients import (
    BATCH_PRICE_FACTOR,
    SOURCE_PNG_KEY,
    CallResult,
    RetryPolicy,
    Usage,
    png_bytes,
    price_for,
)
from ctiqa.imaging import DEFAULT_ENCODING, image_sha256
from ctiqa.ldctiqa import SPLIT_METHODS, SPLITS
from ctiqa.paths import DATASET_MARKER, check_output_path, lock_output, move_aside
from ctiqa.prompts import DEFAULT_TARGET_FORMAT

from . import checks
from .cache import AnswerCache, cache_key, default_cache_path
from .teachers import TEACHERS, Teacher, TemplateTeacher, make_teacher

NO_TEACHER = "none"
#: Largest parquet shard, in bytes of Arrow data: ``datasets.config.MAX_SHARD_SIZE`` ("500MB"), push_to_hub's default.
DEFAULT_MAX_SHARD_BYTES = 500_000_000


# --------------------------------------------------------------------------------------------------- items
@dataclass
class Item:
    """One image of the build: id, split, true score, degradation metadata (simulated data) and its PNG.

    ``extra``: more row values (columns declared through :func:`features`'s ``extra``), e.g. measured findings.
    """

    id: str
    split: str
    score: float
    metadata: dict[str, Any] | None
    png: bytes = b""
    sha: str = ""
    key: str = ""
    result: CallResult | None = None
    check: checks.CheckResult | None = None
    status: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    previous: list[CallResult] = field(default_factory=list)  # answers rejected and asked again (costed)

    def image(self) -> Image.Image:
        """The decoded RGB image; it carries its PNG bytes (``SOURCE_PNG_KEY``) so teachers send them as they are."""
        im = Image.open(io.BytesIO(self.png))
        im.load()
        im.info[SOURCE_PNG_KEY] = self.png
        return im


def plan_items(data: Any, split_method: str, seed: int, limit: int | None) -> list[Item]:
    """Items of every split in a fixed order (train, validation, test; ids as ``split_ids`` returns them).

    ``limit``: keep only the first ``limit`` ids of each split (a cheap trial run).
    """
    from ctiqa.ldctiqa import split_ids

    parts = split_ids(data, split_method, seed=seed)
    missing = [s for s in SPLITS if s not in parts]
    if missing:
        raise CTIQAError(f"split method {split_method!r} returned no {', '.join(missing)} split")
    items = []
    for split in SPLITS:
        for i in list(parts[split])[:limit]:
            items.append(Item(id=i, split=split, score=float(data.scores[i]), metadata=data.metadata.get(i)))
    return items


def render_items(data: Any, items: list[Item], encoding: str, workers: int | None = None,
                 progress: bool = True, unit_is_hu: bool = False) -> None:
    """Render + PNG-encode every item (threads; PIL's zlib releases the GIL) and fill ``png`` and ``sha``.
    ``unit_is_hu``: LDCTIQA's [0, 1] values are HU = -135 + 350·x (:func:`ctiqa.imaging.render`; needed for the
    medgemma-3window encoding)."""
    from ctiqa.imaging import render

    def one(item: Item) -> None:
        im = render(data.image_path(item.id), encoding, unit_is_hu=unit_is_hu)
        item.png, item.sha = png_bytes(im), image_sha256(im)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        from tqdm.auto import tqdm

        list(tqdm(pool.map(one, items), total=len(items), desc="render", disable=not progress, file=sys.stderr))


#: Columns of measured findings (ctiqa.findings) added to every row.
FINDINGS_COLUMNS = ("noise_hu", "noise_severity", "streak_index", "streaks")
#: Rejection reasons a teacher can fix when told: such rows are asked again with the evidence (``--reask``).
REASK_REASONS = ("contradicts_findings", "unseen_view", "mentions_given_score", "contradicts_score", "too_short")
#: Part of the answer-cache key: the teacher prompt carries the measured findings (ctiqa.prompts.grounding_text).
GROUNDING_VERSION = "grounded-v1"


def measure_items(items: list[Item]) -> int:
    """Measured findings of each rendered image (:func:`ctiqa.findings.measure_rendered`): the row columns
    :data:`FINDINGS_COLUMNS` in ``item.extra`` (None when the image cannot be measured, e.g. smaller than 32 px)
    and the teacher's grounding (:func:`ctiqa.findings.grounding`) in ``item.metadata["grounding"]``.
    Returns how many images were measured."""
    from ctiqa.findings import grounding, measure_rendered

    n = 0
    for it in items:
        try:
            row = measure_rendered(it.image(), it.id).to_row()
            n += 1
        except CTIQAError:
            row = None
        it.extra |= {k: (row or {}).get(k) for k in FINDINGS_COLUMNS}
        it.metadata = {**(it.metadata or {}), "grounding": grounding(row, it.metadata)}
    return n


def findings_features() -> dict[str, Any]:
    """``datasets`` features of :data:`FINDINGS_COLUMNS`."""
    from datasets import Value

    return {"noise_hu": Value("float64"), "noise_severity": Value("string"), "streak_index": Value("float64"),
            "streaks": Value("bool")}


def check_item(item: Item, min_words: int) -> checks.CheckResult:
    """The audit of an item's answer (:func:`checks.check_rationale` with the image's grounding)."""
    res = item.result
    assert res is not None
    teacher_score = (res.parsed or {}).get("score")
    return checks.check_rationale(res.rationale or "", item.score,
                                  teacher_score if isinstance(teacher_score, (int, float)) else None,
                                  min_words=min_words, grounding=(item.metadata or {}).get("grounding"))


# --------------------------------------------------------------------------------------------------- teacher runs
@dataclass
class RunStats:
    """What a teacher run did: answers from the cache, new calls (ok / failed), tokens and cost of the new calls
    (batch answers at the batch price)."""

    cached_ok: int = 0
    cached_failed: int = 0
    called: int = 0
    new_ok: int = 0
    new_failed: int = 0
    usage_new: Usage = field(default_factory=Usage)
    batch_new: int = 0
    new_results: list[CallResult] = field(default_factory=list, repr=False)
    reasked: int = 0

    def __add__(self, other: RunStats) -> RunStats:
        return RunStats(self.cached_ok + other.cached_ok, self.cached_failed + other.cached_failed,
                        self.called + other.called, self.new_ok + other.new_ok, self.new_failed + other.new_failed,
                        self.usage_new + other.usage_new, self.batch_new + other.batch_new,
                        self.new_results + other.new_results, self.reasked + other.reasked)


def triage(items: list[Item], teacher: Teacher, cache: AnswerCache | None, stats: RunStats, *,
           retry_failed: bool, prompt_version: str) -> list[Item]:
    """Set ``item.key`` and fill ``item.result`` from the cache where it can; returns the items still to ask.

    A key with an ``ok`` record is finished; one whose last record failed is asked again unless
    ``retry_failed`` is False. Updates ``stats.cached_ok`` / ``stats.cached_failed``.
    """
    todo: list[Item] = []
    use_cache = cache is not None and teacher.cacheable
    for item in items:
        item.key = cache_key(item.sha, prompt_version, teacher.model_id, item.score)
        if use_cache:
            rec = cache.finished(item.key)
            if rec is not None:
                item.result = AnswerCache.result_of(rec)
                stats.cached_ok += 1
                continue
            last = cache.last(item.key)
            if last is not None and not retry_failed:
                item.result = AnswerCache.result_of(last)
                stats.cached_failed += 1
                continue
        todo.append(item)
    return todo


def _cache_fields(item: Item, teacher: Teacher, prompt_version: str) -> dict[str, Any]:
    return {"key": item.key, "image_sha256": item.sha, "prompt_version": prompt_version, "teacher": teacher.model_id,
            "score": item.score, "id": item.id}


def _count(stats: RunStats, res: CallResult) -> None:
    stats.called += 1
    stats.usage_new = stats.usage_new + res.usage
    stats.batch_new += int(res.batch)
    stats.new_results.append(res)
    if res.ok:
        stats.new_ok += 1
    else:
        stats.new_failed += 1


async def annotate(items: list[Item], teacher: Teacher, cache: AnswerCache | None, *, concurrency: int = 8,
                   retry_failed: bool = True, prompt_version: str, progress: bool = True) -> RunStats:
    """Fill ``item.result`` for every item: from the cache when finished, else by asking ``teacher``.

    At most ``concurrency`` requests are in flight. Each answer is appended to ``cache`` (when the teacher is
    cacheable) the moment it arrives. A :class:`~ctiqa.clients.ClientConfigError` cancels the other requests and
    propagates; answers that arrived before it are already on disk.
    """
    stats = RunStats()
    todo = triage(items, teacher, cache, stats, retry_failed=retry_failed, prompt_version=prompt_version)
    if not todo:
        return stats
    use_cache = cache is not None and teacher.cacheable
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(item: Item) -> Item:
        async with sem:
            image = await asyncio.to_thread(item.image)
            item.result = await teacher.explain(image, item.score, item.metadata)
        return item

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"teacher {teacher.model_id}", unit="img", disable=not progress,
               file=sys.stderr)
    tasks = [asyncio.ensure_future(one(it)) for it in todo]
    try:
        for fut in asyncio.as_completed(tasks):
            item = await fut
            res = item.result
            assert res is not None
            if use_cache:
                cache.append(item.key, res, **{k: v for k, v in _cache_fields(item, teacher, prompt_version).items()
                                               if k != "key"})
            _count(stats, res)
            bar.set_postfix(done=stats.new_ok, failed=stats.new_failed, remaining=len(todo) - stats.called)
            bar.update()
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        bar.close()
    return stats


async def annotate_batch(items: list[Item], teacher: Teacher, cache: AnswerCache, jobs: Path, *,
                         retry_failed: bool = True, prompt_version: str, poll_s: float = 30.0,
                         progress: bool = True) -> RunStats:
    """As :func:`annotate`, through the Gemini Batch API (:mod:`datasets_builder.batch`): open jobs in the job
    log ``jobs`` are resumed, new ones submitted and recorded, and every answer lands in ``cache``."""
    from .batch import JobLog, run_batches

    stats = RunStats()
    todo = triage(items, teacher, cache, stats, retry_failed=retry_failed, prompt_version=prompt_version)
    by_key = {it.key: it for it in todo}

    def record(key: str, res: CallResult, fields: dict[str, Any]) -> None:
        cache.append(key, res, **{k: v for k, v in fields.items() if k != "key"})
        item = by_key.get(key)
        if item is not None:
            item.result = res
            _count(stats, res)

    await run_batches(todo, teacher, JobLog(jobs), record=record,
                      fields=lambda it: _cache_fields(it, teacher, prompt_version), poll_s=poll_s, progress=progress)
    return stats


# --------------------------------------------------------------------------------------------------- dataset
def features(synthetic: bool, extra: dict[str, Any] | None = None) -> Any:
    """The ``datasets.Features`` of the schema in notes/common.md (``score`` float64: no float32 rounding).

    Args:
        synthetic: add the degradation columns of simulated data.
        extra: more columns, ``{name: datasets feature}`` (e.g. measured findings); rows fill them from
            ``Item.extra``.
    """
    from datasets import Features, Image, List, Value

    message = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    f = {
        "id": Value("string"), "score": Value("float64"), "prompt": message, "completion": message,
        "images": List(Image()), "rationale": Value("string"), "teacher": Value("string"),
        "prompt_version": Value("string"), "target_format": Value("string"),
    }
    if synthetic:
        f |= {"base_slice": Value("string"), "dose_fraction": Value("float64"), "n_views": Value("int32"),
              "synthetic": Value("bool")}
    return Features(f | (extra or {}))


def make_row(item: Item, fmt: str, rationale: str, teacher_id: str, synthetic: bool) -> dict[str, Any]:
    """One dataset row (the columns of :func:`features`, then ``item.extra``). Without a rationale the completion
    holds the score line only. The image is stored as its PNG bytes (``{"bytes": ..., "path": None}``)."""
    from ctiqa import prompts

    target = prompts.format_target(item.score, rationale or None, fmt if rationale else "score-only")
    row = {
        "id": item.id, "score": item.score, "prompt": prompts.prompt_messages(fmt),
        "completion": prompts.completion_messages(target), "images": [{"bytes": item.png, "path": None}],
        "rationale": rationale, "teacher": teacher_id if rationale else NO_TEACHER,
        "prompt_version": prompts.PROMPT_VERSION, "target_format": fmt,
    }
    if synthetic:
        md = item.metadata or {}
        row |= {"base_slice": str(md.get("base_slice", "")), "dose_fraction": md.get("dose_fraction"),
                "n_views": md.get("n_views"), "synthetic": True}
    return row | item.extra


def assemble(items: list[Item], fmt: str, teacher_id: str, synthetic: bool, rationale_splits: tuple[str, ...],
             min_words: int = checks.MIN_WORDS) -> dict[str, list[dict[str, Any]]]:
    """Check rationales, set ``item.status`` and return the rows of each split (see :func:`to_dataset`).

    Status: ``kept`` (row with rationale), ``no_rationale`` (row without: score-only format or a split without
    rationales), ``failed`` (teacher request failed: left out), ``rejected`` (rationale rejected: left out).
    """
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for item in items:
        wants = fmt != "score-only" and item.split in rationale_splits
        if not wants:
            item.status = "no_rationale"
            rows[item.split].append(make_row(item, fmt, "", teacher_id, synthetic))
            continue
        res = item.result
        if res is None or not res.ok:
            item.status = "failed"
            continue
        item.check = check_item(item, min_words)
        if not item.check.ok:
            item.status = "rejected"
            continue
        item.status = "kept"
        rows[item.split].append(make_row(item, fmt, item.check.text, teacher_id, synthetic))
    return rows


def to_dataset(rows: dict[str, list[dict[str, Any]]], feats: Any) -> Any:
    """The ``DatasetDict`` of the rows of every split (each split must hold at least one row)."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({s: Dataset.from_list(r, features=feats) for s, r in rows.items()})


AUDIT_COLUMNS = ("id", "split", "score", "status", "reasons", "evidence", "flags", "reasked", "failure",
                 "finish_reason", "attempts", "words", *checks.ARTIFACT_TERMS)


def audit_csv(items: list[Item]) -> str:
    """``audit.csv`` text: one row per image: status, rejection reasons and evidence, failure, artifact-term
    counts."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=AUDIT_COLUMNS, lineterminator="\n")
    w.writeheader()
    for it in items:
        res, chk = it.result, it.check
        w.writerow({
            "id": it.id, "split": it.split, "score": it.score, "status": it.status,
            "reasons": ";".join(chk.reasons) if chk else "", "evidence": " | ".join(chk.evidence) if chk else "",
            "flags": ";".join(chk.flags) if chk else "", "reasked": len(it.previous),
            "failure": (res.error or "") if res is not None and not res.ok else "",
            "finish_reason": (res.finish_reason or "") if res else "", "attempts": res.attempts if res else "",
            "words": chk.words if chk else "", **{t: (chk.terms[t] if chk else "") for t in checks.ARTIFACT_TERMS},
        })
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- output
#: Written first into every ``--out`` folder ctiqa builds (:data:`ctiqa.paths.DATASET_MARKER`).
MARKER = DATASET_MARKER
_OURS = ("README.md", "audit.csv")


def _folder_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink())


def _is_previous_build(out: Path) -> bool:
    """``out`` (a folder) holds nothing but folders, or a build of ctiqa: :data:`MARKER`, or (before the marker
    existed) a README.md naming ``ctiqa build-dataset`` and nothing but README.md, audit.csv and data/*.parquet."""
    files = _folder_files(out)
    if not files or MARKER in files:
        return True
    readme = out / "README.md"
    legacy = readme.is_file() and "`ctiqa build-dataset`" in readme.read_text(encoding="utf-8", errors="replace")
    return legacy and all(f in _OURS or (f.startswith("data/") and f.endswith(".parquet") and f.count("/") == 1)
                          for f in files)


def owned_files(out: Path) -> set[str]:
    """The files of an earlier build in ``out`` that a new build may replace (relative POSIX paths).

    A missing or empty folder: none. A folder with :data:`MARKER`: the files it lists. A folder written by ctiqa
    before the marker existed (:func:`_is_previous_build`): its files.

    Raises:
        CTIQAError: ``out`` is a file, or holds files ctiqa did not write (:func:`ctiqa.paths.check_output_path`;
            nothing is changed).
    """
    check_output_path(out, folder=True, ours=_is_previous_build,
                      hint="Give a new or empty folder (ctiqa writes README.md, audit.csv and data/*.parquet there)")
    files = _folder_files(out) if out.exists() else []
    if MARKER in files:
        try:
            listed = json.loads((out / MARKER).read_text(encoding="utf-8"))["files"]
            return {str(f) for f in listed} | {MARKER}
        except (ValueError, KeyError, TypeError) as e:
            raise CTIQAError(f"{out / MARKER}: unreadable ({e}); move the folder away or delete that file") from e
    return set(files)


def _shards(nbytes: int, rows: int, max_shard_bytes: int) -> int:
    """Shards of a split: ``int(nbytes / max_shard_bytes) + 1``, the rule ``Dataset.push_to_hub`` uses, at most one
    per row."""
    return max(1, min(rows, int(nbytes / max_shard_bytes) + 1))


def write_folder(dsd: Any, out: Path, card_fn: Callable[[Any], Any], audit: str, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, settings: dict[str, Any] | None = None) -> list[Path]:
    """Write ``dsd`` into ``out`` in the Hub's layout, which ``load_dataset(str(out))`` reads:
    ``data/{split}-{i:05d}-of-{n:05d}.parquet`` (``Dataset.to_parquet``; images embedded as PNG bytes; file names
    and shard count as ``push_to_hub`` makes them), ``audit.csv``, ``README.md`` (``card_fn(card_data)``) and
    :data:`MARKER` (JSON: ``tool``, ``settings`` (:func:`build_settings`, what a later build into ``out`` is
    compared with: :func:`previous_build_diff`), ``files``).

    Only files an earlier build wrote are replaced or removed (:func:`owned_files`); the marker, written first,
    lists every file this build may leave, so a kill at any point leaves a folder the next build may rewrite.
    README.md goes last: its presence marks a finished folder.

    Returns:
        the written files.
    Raises:
        CTIQAError: ``out`` holds files ctiqa did not write.
    """
    old = owned_files(out)
    plan: dict[str, Any] = {}
    for split, ds in dsd.items():
        n = _shards(ds.data.nbytes, len(ds), max_shard_bytes)
        for i in range(n):
            plan[f"data/{split}-{i:05d}-of-{n:05d}.parquet"] = (ds, n, i)
    new = sorted([*plan, *_OURS])
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER

    def mark(files: set[str]) -> None:
        marker.write_text(json.dumps({"tool": "ctiqa build-dataset", "settings": settings,
                                      "files": sorted(files - {MARKER})}, indent=1), encoding="utf-8")

    mark(old | set(new))
    (out / "README.md").unlink(missing_ok=True)
    for f in sorted(old - set(new) - {MARKER}):
        (out / f).unlink(missing_ok=True)
    written = []
    for rel, (ds, n, i) in plan.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.shard(num_shards=n, index=i, contiguous=True).to_parquet(str(path))
        written.append(path)
    (out / "audit.csv").write_text(audit, encoding="utf-8")
    # No `configs` in the local card: load_dataset finds the splits from the file names, and its cache key then
    # includes each file's mtime. With `configs` the key is the YAML alone, so a rebuilt folder would be read
    # from the stale cache of the previous build (datasets 5 load.py, LocalDatasetModuleFactory).
    from huggingface_hub import DatasetCardData

    (out / "README.md").write_text(str(card_fn(DatasetCardData())), encoding="utf-8")
    mark(set(new))
    return [out / "audit.csv", *written, out / "README.md"]


#: The :func:`build_settings` keys, as the flags that set them (in refusals: "--limit was none, now 1").
SETTING_FLAGS = {"ldctiqa": "--ldctiqa", "split": "--split", "seed": "--seed", "format": "--format",
                 "encoding": "--encoding", "unit_is_hu": "--unit-is-hu", "limit": "--limit", "teacher": "--teacher",
                 "model": "--model", "base_url": "--base-url", "test_rationales": "--test-rationales",
                 "min_words": "--min-words", "reask": "--reask"}


def _public_url(url: str | None) -> str | None:
    """``url`` without user/password, query or fragment (where keys may ride) and trailing ``/``."""
    if not url:
        return None
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc.rsplit("@", 1)[-1], u.path.rstrip("/"), "", ""))


def build_settings(opts: BuildOptions, root: Path, split: str) -> dict[str, Any]:
    """The settings that define a build's rows, recorded in its ``--out`` folder's :data:`MARKER`: a later build
    into that folder with other settings is refused unless ``--overwrite`` (:func:`previous_build_diff`).

    Args:
        opts: the build's options. root: the data folder as :func:`ctiqa.ldctiqa.load_ldctiqa` resolved it.
        split: the split method ``--split`` resolved to (``auto`` and the method it picks are one setting).
    Returns:
        ``{key of SETTING_FLAGS: JSON value}``: ``ldctiqa`` (absolute, symlinks resolved), ``split``, ``seed``,
        ``format``, ``encoding``, ``unit_is_hu``, ``limit`` (None: all), and the teacher's: ``teacher`` (kind),
        ``model`` (the model id, defaults filled in), ``base_url`` (without credentials: :func:`_public_url`),
        ``test_rationales``, ``min_words``, ``reask`` -- None where they change no row (``--format score-only``
        asks no teacher; the template teacher takes no model or URL and is never asked again).
        Not recorded: how rows are made or stored, not which (progress, concurrency, timeouts, attempts, prices,
        the cache path, ``--batch``, shard size, ``--no-retry-failed``) and the teacher's sampling settings
        (answers are cached without them: a rebuild takes the same answers).
    """
    from .teachers import DEFAULT_MODELS

    teacher = opts.teacher if opts.format != "score-only" else None
    remote = teacher not in (None, "template")
    return {
        "ldctiqa": str(Path(root).resolve()), "split": split, "seed": opts.seed, "format": opts.format,
        "encoding": opts.encoding, "unit_is_hu": opts.unit_is_hu, "limit": opts.limit, "teacher": teacher,
        "model": (opts.model or DEFAULT_MODELS.get(teacher)) if remote else (TemplateTeacher.model_id
                                                                              if teacher else None),
        "base_url": _public_url(opts.base_url) if remote else None,
        "test_rationales": opts.test_rationales if teacher else None,
        "min_words": opts.min_words if teacher else None, "reask": opts.reask if remote else None,
    }


#: :func:`previous_build_diff` of a build whose settings were not recorded (an older ctiqa).
UNKNOWN_SETTINGS = f"settings unknown: built by an older ctiqa, which did not record them in {MARKER}"


def previous_build_diff(out: Path, settings: dict[str, Any]) -> list[str]:
    """How the build already in ``out`` differs from a build with ``settings`` (:func:`build_settings`).

    Returns:
        ``[]``: ``out`` is missing, holds no file, or holds a build with these settings (rebuilding it from the
        cache is allowed). Else one phrase per differing setting (``"--limit was none, now 1"``), or one phrase
        saying the settings are unknown (a build of an older ctiqa: a :data:`MARKER` without ``settings``, or the
        folder before the marker existed).
    Raises:
        CTIQAError: the marker is unreadable.
    """
    out = Path(out)
    if not out.is_dir() or not _folder_files(out):
        return []
    if not (out / MARKER).is_file():
        return [UNKNOWN_SETTINGS]
    try:
        before = json.loads((out / MARKER).read_text(encoding="utf-8")).get("settings")
    except (ValueError, AttributeError) as e:
        raise CTIQAError(f"{out / MARKER}: unreadable ({e}); move the folder away or delete that file") from e
    if not isinstance(before, dict):
        return [UNKNOWN_SETTINGS]

    def show(v: Any) -> str:
        return "none" if v is None else ("on" if v else "off") if isinstance(v, bool) else str(v)

    return [f"{flag} was {show(before.get(k))}, now {show(settings.get(k))}" for k, flag in SETTING_FLAGS.items()
            if before.get(k) != settings.get(k)]


def refuse_previous_build(out: Path, diff: list[str]) -> CTIQAError:
    """The one-line refusal of a build into ``out`` whose earlier build differs (``diff``:
    :func:`previous_build_diff`)."""
    what = (f"a dataset built by an older ctiqa, whose settings are unknown (not recorded in {MARKER})"
            if diff == [UNKNOWN_SETTINGS] else f"a dataset built with other settings ({'; '.join(diff)})")
    return CTIQAError(f"--out {out}: holds {what}; nothing was changed. Give another --out, or --overwrite to move "
                      f"that build aside ({Path(out).name}.<UTC time>.bak, never deleted) and build afresh")


def push_to_hub(dsd: Any, repo_id: str, card_fn: Callable[[Any], Any], audit: str, *, private: bool,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                kept: str = "the local output is kept") -> str:
    """Publish ``dsd`` to a Hub dataset repo: ``DatasetDict.push_to_hub`` (creates the repo, private unless told;
    shards, embeds images, writes ``dataset_info`` and ``configs``), then one commit with our card (merged into the
    YAML ``push_to_hub`` wrote) and ``audit.csv``. The token comes from ``HF_TOKEN`` or ``hf auth login`` and is
    never printed.

    Returns:
        the URL of the card commit.
    Raises:
        CTIQAError: no token; the push failed (:func:`ctiqa.cards.hub_push`).
    """
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi, get_token

    from ctiqa.cards import hub_push

    if not get_token():
        raise CTIQAError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    with hub_push(repo_id, kept):
        dsd.push_to_hub(repo_id, private=private, max_shard_size=max_shard_bytes,
                        commit_message="ctiqa build-dataset: data")
        card = card_fn(DatasetCard.load(repo_id, repo_type="dataset").data)
        info = HfApi().create_commit(repo_id, repo_type="dataset", commit_message="ctiqa build-dataset: card, audit",
                                     operations=[CommitOperationAdd("README.md", str(card).encode("utf-8")),
                                                 CommitOperationAdd("audit.csv", audit.encode("utf-8"))])
    return str(info.commit_url)


# --------------------------------------------------------------------------------------------------- orchestration
class EmptySplitError(CTIQAError):
    """A split would hold no row (every teacher request failed or was rejected): nothing was written. The
    ``ctiqa build-dataset`` command prints it after the failure summary and exits with status 1."""


@dataclass
class BuildOptions:
    """Options of :func:`build_dataset` (the CLI flags; see ``ctiqa build-dataset --help``)."""

    ldctiqa: Path
    teacher: str = "template"
    out: Path | None = None
    push_to_hub: str | None = None
    public: bool = False
    model: str | None = None
    base_url: str | None = None
    split: str = "auto"
    seed: int = 0
    format: str = DEFAULT_TARGET_FORMAT
    encoding: str = DEFAULT_ENCODING
    unit_is_hu: bool = False
    concurrency: int = 8
    cache: Path | None = None
    max_output_tokens: int | None = None
    thinking_budget: int | None = 2048
    temperature: float | None = None
    timeout_s: float = 300.0
    max_attempts: int = 6
    limit: int | None = None
    retry_failed: bool = True
    test_rationales: bool = False
    min_words: int = checks.MIN_WORDS
    price_input: float | None = None
    price_output: float | None = None
    progress: bool = True
    batch: bool = False
    batch_poll_s: float = 30.0
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    reask: int = 0
    overwrite: bool = False


@dataclass
class BuildResult:
    """What :func:`build_dataset` made: the dataset, per-image items, run stats, provenance, written files."""

    dataset: Any
    items: list[Item]
    stats: RunStats
    provenance: dict[str, Any]
    files: list[Path]
    commit_url: str | None = None


def check_options(opts: BuildOptions) -> None:
    """Refuse bad options before any work (one line each).

    Raises:
        CTIQAError: no output target; a count or time that is not positive, a price, word count or re-ask count
            below 0, a temperature outside [0, 2]; unknown format; ``--batch`` without
            ``--teacher gemini``; ``--cache`` a folder; ``--out`` holding files ctiqa did not write, or a dataset
            built with other (or unknown) settings without ``overwrite`` (:func:`previous_build_diff`; the data
            folder's labels are read to resolve ``--split auto``); ``--push-to-hub`` without a token.
    """
    from ctiqa import prompts

    if opts.out is None and opts.push_to_hub is None:
        raise CTIQAError("give --out DIR, --push-to-hub REPO_ID, or both")
    for flag, value in (("--limit", opts.limit), ("--concurrency", opts.concurrency),
                        ("--max-attempts", opts.max_attempts), ("--timeout", opts.timeout_s),
                        ("--batch-poll", opts.batch_poll_s), ("--max-shard-mb", opts.max_shard_bytes),
                        ("--max-output-tokens", opts.max_output_tokens)):
        if value is not None and not value > 0:
            raise CTIQAError(f"{flag} must be positive, got {value}")
    for flag, value in (("--reask", opts.reask), ("--min-words", opts.min_words),
                        ("--price-input", opts.price_input), ("--price-output", opts.price_output)):
        if value is not None and value < 0:
            raise CTIQAError(f"{flag} must be 0 or more, got {value}")
    if opts.temperature is not None and not 0 <= opts.temperature <= 2:  # the range Gemini and OpenAI accept
        raise CTIQAError(f"--temperature must be in [0, 2], got {opts.temperature}")
    if opts.format not in prompts.TARGET_FORMATS:
        raise CTIQAError(f"unknown --format {opts.format!r}; choose one of {', '.join(prompts.TARGET_FORMATS)}")
    if opts.batch and opts.teacher != "gemini":
        raise CTIQAError(f"--batch needs --teacher gemini (the Gemini Batch API), not --teacher {opts.teacher}")
    if opts.cache is not None and opts.cache.is_dir():
        raise CTIQAError(f"--cache {opts.cache} is a folder; give a file (e.g. {opts.cache / 'answers.jsonl'})")
    if opts.cache is not None and opts.out is not None and \
            Path(os.path.realpath(opts.cache)).is_relative_to(os.path.realpath(opts.out)):
        # the build would refuse its own --out afterwards (a file it does not own), after paying for the answers
        raise CTIQAError(f"--cache {opts.cache} is inside --out {opts.out}: keep the answer cache outside the dataset "
                         "folder (it holds every paid answer; the dataset folder is rewritten by each build)")
    if opts.out is not None:
        owned_files(opts.out)
        if not opts.overwrite and Path(opts.out).is_dir() and _folder_files(Path(opts.out)):  # a build: compare
            from ctiqa.ldctiqa import load_ldctiqa, resolve_split_method

            data = load_ldctiqa(opts.ldctiqa, check_images=False)
            diff = previous_build_diff(opts.out, build_settings(opts, data.root,
                                                                resolve_split_method(data, opts.split)[0]))
            if diff:
                raise refuse_previous_build(opts.out, diff)
    if opts.push_to_hub is not None:
        from huggingface_hub import get_token

        if not get_token():
            raise CTIQAError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")


def _cost(results: list[CallResult], price: tuple[float, float] | None) -> float | None:
    return None if price is None else sum(r.cost_usd(price) for r in results)


def build_dataset(opts: BuildOptions, teacher: Teacher | None = None) -> BuildResult:
    """Run the whole build (module docstring). ``teacher`` overrides the one named in ``opts`` (tests).

    Order: options and the output folder are checked and the folder locked (``<out>.lock``: a second build into it
    is refused while this one runs), then the teacher is made (a missing API key stops here),
    then the data is read and rendered, the teacher asked, the rows checked and written.

    Raises:
        CTIQAError: bad options or data folder, ``--out`` holding other files, teacher configuration (no key,
            bad key, quota 0, unreachable server).
        EmptySplitError: a split without rows (its summary is printed first; nothing is written).
    """
    check_options(opts)
    lock = lock_output(Path(opts.out), "ctiqa build-dataset") if opts.out is not None else None
    try:
        return _build_dataset(opts, teacher)
    finally:
        if lock is not None:
            lock.release()


def _build_dataset(opts: BuildOptions, teacher: Teacher | None) -> BuildResult:
    """:func:`build_dataset` once its options are checked and its ``--out`` is locked."""
    import ctiqa
    from ctiqa import prompts
    from ctiqa.imaging import encoding_info
    from ctiqa.ldctiqa import load_ldctiqa, resolve_split_method

    enc = encoding_info(opts.encoding)
    needs_teacher = opts.format != "score-only"
    if needs_teacher and teacher is None:
        teacher = make_teacher(
            opts.teacher, model=opts.model, base_url=opts.base_url, max_output_tokens=opts.max_output_tokens,
            thinking_budget=opts.thinking_budget, temperature=opts.temperature, timeout_s=opts.timeout_s,
            retry=RetryPolicy(max_attempts=opts.max_attempts), seed=opts.seed)
    data = load_ldctiqa(opts.ldctiqa)
    split, why = resolve_split_method(data, opts.split)
    print(f"split: {split} ({why})")
    items = plan_items(data, split, opts.seed, opts.limit)
    rationale_splits = ("train", "validation", "test") if opts.test_rationales else ("train", "validation")
    if needs_teacher and isinstance(teacher, TemplateTeacher):
        no_md = [it.id for it in items if (it.metadata or {}).get("dose_fraction") is None]
        if no_md:
            raise CTIQAError(
                f"{opts.ldctiqa}: the template teacher needs degradations.json metadata (dose_fraction, n_views) "
                f"for every image; {len(no_md)} image(s) have none (e.g. {no_md[0]}): real LDCTIQA needs "
                "--teacher gemini or --teacher openai")
    render_items(data, items, opts.encoding, progress=opts.progress, unit_is_hu=opts.unit_is_hu)
    n_measured = measure_items(items)

    stats = RunStats()
    teacher_id = NO_TEACHER
    teacher_kind = "none (score-only format)"
    cache_path = None
    if needs_teacher:
        assert teacher is not None
        teacher_id, teacher_kind = teacher.model_id, opts.teacher + (" (Batch API)" if opts.batch else "")
        asked = [it for it in items if it.split in rationale_splits]
        cache = None
        if teacher.cacheable:
            cache_path = opts.cache or default_cache_path()
            cache = AnswerCache(cache_path)
            print(f"answer cache: {cache_path}", file=sys.stderr)
        try:
            stats = asyncio.run(_annotate_and_close(asked, teacher, cache, cache_path, opts,
                                                    f"{prompts.PROMPT_VERSION}+{GROUNDING_VERSION}"))
        finally:
            if cache is not None:
                cache.close()

    rows = assemble(items, opts.format, teacher_id, data.synthetic, rationale_splits, opts.min_words)
    kept = [it for it in items if it.status == "kept"]
    terms = {t: sum(1 for it in kept if it.check and it.check.terms[t]) for t in checks.ARTIFACT_TERMS}
    rejections = Counter(r for it in items if it.status == "rejected" and it.check for r in it.check.reasons)
    failures = Counter((it.result.reason if it.result else "not_asked") for it in items if it.status == "failed")
    answers = [r for it in items if it.split in rationale_splits and it.result is not None
               for r in (*it.previous, it.result)] if needs_teacher else []
    usage = sum((r.usage for r in answers), Usage())
    price = _price(opts, teacher_id)
    prov = {
        "source": f"{'simulated mini-LDCTIQA (ctiqa simulate)' if data.synthetic else 'LDCTIQA 2023'}, folder "
                  f"`{Path(data.root).name}` ({len(data.ids)} images)",
        "synthetic": data.synthetic, "teacher": teacher_id, "teacher_kind": teacher_kind,
        "prompt_version": prompts.PROMPT_VERSION, "target_format": opts.format, "encoding": enc,
        "unit_is_hu": opts.unit_is_hu,
        "split": split, "split_reason": why, "seed": opts.seed, "counts": {s: len(rows[s]) for s in SPLITS},
        "rationale_splits": list(rationale_splits) if needs_teacher else [],
        "status": dict(Counter(it.status for it in items)), "rejections": dict(rejections),
        "failures": dict(failures), "terms": terms, "n_rationales": len(kept),
        "grounding": {"measured": n_measured, "reasked": sum(1 for it in items if it.previous),
                      "reasked_kept": sum(1 for it in kept if it.previous),
                      "max_reasks": opts.reask if needs_teacher and teacher is not None and teacher.cacheable else 0,
                      "flags": dict(Counter(f.split(":")[0] for it in kept if it.check for f in it.check.flags)),
                      "unverified_artifacts": dict(Counter(f.split(": ")[1] for it in kept if it.check
                                                           for f in it.check.flags if ": " in f))},
        "usage": {"prompt_tokens": usage.prompt_tokens, "output_tokens": usage.output_tokens,
                  "thoughts_tokens": usage.thoughts_tokens, "cost_usd": _cost(answers, price),
                  "batch_answers": sum(1 for r in answers if r.batch)},
        "ctiqa_version": ctiqa.__version__,
    }
    empty = [s for s in SPLITS if not rows[s]]
    if empty:
        _report(stats, prov, usage, price, teacher_id, None, None, cache_path, items)
        raise EmptySplitError(
            f"no rows for split(s) {', '.join(empty)}: every image of {'them' if len(empty) > 1 else 'it'} failed or "
            "was rejected (summary above); nothing was written. Answers so far are in the cache: fix the cause and "
            "re-run")

    from .card import make_card

    dsd = to_dataset(rows, features(data.synthetic, findings_features()))
    audit = audit_csv(items)

    def card_fn(card_data: Any) -> Any:
        return make_card(prov, card_data)

    quiet = not opts.progress
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    settings = build_settings(opts, data.root, split)
    if opts.out is not None and (diff := previous_build_diff(opts.out, settings)):
        if not opts.overwrite:  # written since check_options looked (before this build took the lock)
            raise refuse_previous_build(opts.out, diff)
        move_aside([Path(os.path.abspath(opts.out))], "dataset build")
    try:
        files = write_folder(dsd, opts.out, card_fn, audit, max_shard_bytes=opts.max_shard_bytes,
                             settings=settings) if opts.out is not None else []
        kept = "the local output is kept" if opts.out is not None else \
            "nothing was written locally (a remote teacher's answers are kept in the answer cache)"
        commit = push_to_hub(dsd, opts.push_to_hub, card_fn, audit, private=not opts.public, kept=kept,
                             max_shard_bytes=opts.max_shard_bytes) if opts.push_to_hub else None
    finally:
        if quiet:
            datasets.enable_progress_bars()
    _report(stats, prov, usage, price, teacher_id, opts.out, commit, cache_path, items)
    return BuildResult(dsd, items, stats, prov, files, commit)


async def _annotate_and_close(items: list[Item], teacher: Teacher, cache: AnswerCache | None,
                              cache_path: Path | None, opts: BuildOptions, prompt_version: str) -> RunStats:
    """Ask the teacher for every item, then ask again (up to ``opts.reask`` rounds) the items whose answer the
    audit rejects for a reason the teacher can fix (:data:`REASK_REASONS`), with the audit's evidence in the
    prompt. Each round has its own cache keys (``...+reaskK``), so a re-run takes every round from the cache."""

    async def run(todo: list[Item], pv: str) -> RunStats:
        if opts.batch:
            if cache is None or cache_path is None:
                raise CTIQAError("--batch needs a remote teacher with an answer cache (--teacher gemini)")
            from .batch import job_log_path

            return await annotate_batch(todo, teacher, cache, job_log_path(cache_path),
                                        retry_failed=opts.retry_failed, prompt_version=pv,
                                        poll_s=opts.batch_poll_s, progress=opts.progress)
        return await annotate(todo, teacher, cache, concurrency=opts.concurrency, retry_failed=opts.retry_failed,
                              prompt_version=pv, progress=opts.progress)

    try:
        stats = await run(items, prompt_version)
        for k in range(1, (opts.reask if teacher.cacheable else 0) + 1):  # a template answers the same again
            redo = []
            for it in items:
                if it.result is not None and it.result.ok:
                    chk = check_item(it, opts.min_words)
                    fixable = [e for r, e in zip(chk.reasons, chk.evidence, strict=True) if r in REASK_REASONS]
                    if fixable:
                        it.metadata = {**(it.metadata or {}), "feedback": "; ".join(fixable)}
                        it.previous.append(it.result)
                        redo.append(it)
            if not redo:
                break
            print(f"asking again ({k}/{opts.reask}): {len(redo)} rationale(s) rejected for a fixable reason",
                  file=sys.stderr)
            more = await run(redo, f"{prompt_version}+reask{k}")
            more.reasked = len(redo)
            stats = stats + more
        return stats
    finally:
        await teacher.aclose()


def _price(opts: BuildOptions, teacher_id: str) -> tuple[float, float] | None:
    known = price_for(teacher_id)
    if opts.price_input is None and opts.price_output is None:
        return known
    base = known or (0.0, 0.0)
    return (opts.price_input if opts.price_input is not None else base[0],
            opts.price_output if opts.price_output is not None else base[1])


def flags_summary(g: dict[str, Any]) -> str:
    """The flags of the kept rationales (provenance ``grounding``: ``flags``, ``unverified_artifacts``) in one
    phrase, most frequent first, e.g. ``"unverified_artifact metal 4, ring 4; unverified_streaks 2"``; "" when none
    is flagged."""
    def most(counts: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    parts = []
    for kind, n in most(g.get("flags") or {}):
        named = most(g.get("unverified_artifacts") or {}) if kind == "unverified_artifact" else []
        parts.append(f"{kind} " + (", ".join(f"{k} {v}" for k, v in named) if named else str(n)))
    return "; ".join(parts)


def _report(stats: RunStats, prov: dict[str, Any], usage: Usage, price: tuple[float, float] | None,
            teacher_id: str, out: Path | None, commit: str | None, cache_path: Path | None,
            items: list[Item]) -> None:
    p = print
    p(f"teacher {teacher_id}: {stats.cached_ok} answers from the cache, {stats.called} new calls "
      f"({stats.new_ok} ok, {stats.new_failed} failed), {stats.cached_failed} cached failures not retried")
    if cache_path is not None:  # remote teachers only: the template teacher uses no tokens
        u = stats.usage_new
        cost_new, cost_all = _cost(stats.new_results, price), prov["usage"]["cost_usd"]
        batch = (f" ({stats.batch_new} batch answers at {BATCH_PRICE_FACTOR:.0%} of the synchronous price)"
                 if stats.batch_new else "")
        p(f"tokens this run: prompt {u.prompt_tokens:,}, output {u.output_tokens:,}, thinking "
          f"{u.thoughts_tokens:,}" + (f"; estimated cost USD {cost_new:.4f}{batch}" if cost_new is not None else ""))
        p(f"tokens of the dataset's answers (cached included): prompt {usage.prompt_tokens:,}, output "
          f"{usage.output_tokens:,}, thinking {usage.thoughts_tokens:,}"
          + (f"; estimated cost USD {cost_all:.4f}" if cost_all is not None else ""))
        if price:
            p(f"  prices: USD {price[0]}/1M input, {price[1]}/1M output incl. thinking (ai.google.dev/gemini-api/"
              f"docs/pricing, 2025-07; Batch API {BATCH_PRICE_FACTOR:.0%} of these; override with --price-input/"
              "--price-output)")
    p("rows: " + ", ".join(f"{s} {n}" for s, n in prov["counts"].items())
      + "; status: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["status"].items())))
    if prov["failures"]:
        p("failed requests (left out; re-run to retry): "
          + ", ".join(f"{k} {v}" for k, v in sorted(prov["failures"].items())))
        examples = {}
        for it in items:
            if it.status == "failed" and it.result is not None and it.result.reason not in examples:
                examples[it.result.reason] = it.result.error
        for error in examples.values():
            p(f"  e.g. {error}")
    if prov["rejections"]:
        p("rejected rationales (left out): " + ", ".join(f"{k} {v}" for k, v in sorted(prov["rejections"].items())))
    if flagged := flags_summary(prov["grounding"]):
        p(f"kept rationales flagged (see audit.csv): {flagged}")
    if out is not None:
        p(f"wrote {out} (data/*.parquet, README.md, audit.csv)")
    if commit:
        p(f"pushed to the Hub: {commit}")


# --------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ctiqa build-dataset``."""
    from ctiqa.cli import non_negative_int
    from ctiqa.imaging import ENCODINGS
    from ctiqa.prompts import TARGET_FORMATS

    parser.description = (
        "Teacher rationales -> chat-format dataset (train/validation/test) in a local Hub-layout folder and/or on "
        "the Hugging Face Hub. Remote teacher answers are cached as they arrive; a re-run resumes.")
    a = parser.add_argument
    a("--ldctiqa", type=Path, required=True, help="LDCTIQA folder (image/NNNN.tif + train.json), or `ctiqa simulate` output")
    a("--teacher", choices=TEACHERS, default="template",
      help="gemini (GEMINI_API_KEY), openai (any OpenAI-compatible server: --base-url), template (simulated data "
           "only; offline). Default: template")
    a("--out", type=Path, help="write a Hub-layout folder here (data/*.parquet, README.md, audit.csv)")
    a("--push-to-hub", metavar="REPO_ID", help="upload to this Hub dataset repo (private unless --public)")
    a("--public", action="store_true", help="create the Hub repo public")
    a("--overwrite", action="store_true",
      help="--out holds a dataset built with other settings (data folder, teacher, model, split, seed, format, "
           "encoding, --limit, ...; recorded in its .ctiqa-dataset.json) or by an older ctiqa: move that build aside "
           "(DIR.<UTC time>.bak, never deleted) and build afresh. Without it such a build is refused; the same "
           "settings again rebuild in place (answers from the cache)")
    a("--model", help="teacher model id (gemini default gemini-2.5-pro; openai: the served model name)")
    a("--base-url", help="API root: required for --teacher openai (e.g. http://localhost:8000/v1)")
    a("--split", choices=SPLIT_METHODS, default="auto",
      help="paper (shipped 800/100/100 ids), stratified (seeded 80/10/10), base-slice (simulated data); auto: paper "
           "for the full LDCTIQA training release, base-slice for `ctiqa simulate` output, else stratified. "
           "Default: auto")
    a("--seed", type=non_negative_int, default=0, help="split seed (stratified, base-slice) and template wording seed")
    a("--format", choices=TARGET_FORMATS, default=DEFAULT_TARGET_FORMAT,
      help=f"target text format. Default: {DEFAULT_TARGET_FORMAT}")
    a("--encoding", default=DEFAULT_ENCODING, choices=ENCODINGS,
      help=f"CT -> RGB encoding (ctiqa.imaging.render). Default: {DEFAULT_ENCODING}")
    a("--unit-is-hu", action="store_true",
      help="treat LDCTIQA [0,1] values as HU = -135 + 350*x (needed for --encoding medgemma-3window on LDCTIQA data; "
           "give ctiqa predict --unit-is-hu too for such TIFFs)")
    a("--concurrency", type=int, default=8, help="teacher requests in flight. Default: 8")
    a("--cache", type=Path, help=f"answer cache JSONL (default {default_cache_path()})")
    a("--max-output-tokens", type=int, help="output-token limit per answer, thinking included (gemini default 8192)")
    a("--thinking-budget", type=int, default=2048,
      help="Gemini thinking tokens (2.5 Pro: 128-32768; 0 = off on Flash; -1 = not sent: the model's dynamic "
           "default, and for models without thinking). Default: 2048")
    a("--temperature", type=float, help="teacher sampling temperature (default: the model's)")
    a("--timeout", type=float, default=300.0, help="seconds per request attempt. Default: 300")
    a("--max-attempts", type=int, default=6, help="attempts per request on 429/5xx/timeouts. Default: 6")
    a("--limit", type=int, help="keep only the first N images of each split (a cheap trial run)")
    a("--no-retry-failed", dest="retry_failed", action="store_false",
      help="do not ask again for images whose cached answer failed (default: ask again)")
    a("--test-rationales", action="store_true", help="also ask the teacher for test images (not needed to evaluate)")
    a("--min-words", type=int, default=checks.MIN_WORDS, help=f"reject shorter rationales. Default: {checks.MIN_WORDS}")
    a("--reask", type=int, default=2, help="ask a rejected rationale again with the reason (contradicts the measured "
      "findings, unseen views, ...) up to this many times; cached and costed. Default: 2")
    a("--price-input", type=float, help="USD per 1M input tokens for the cost estimate")
    a("--price-output", type=float, help="USD per 1M output tokens (thinking included) for the cost estimate")
    a("--batch", action="store_true",
      help="gemini: ask through the Batch API (answers within 24 h at half the price). The job ids are recorded "
           "beside the cache; stopping is safe and a re-run resumes the same jobs, never submitting paid work again")
    a("--batch-poll", type=float, default=30.0, help="seconds between polls of open batch jobs. Default: 30")
    a("--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e6,
      help=f"largest parquet shard, MB of Arrow data. Default: {DEFAULT_MAX_SHARD_BYTES / 1e6:g} (as push_to_hub)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``ctiqa build-dataset``; returns 0, 1 when a split ended without rows (:class:`EmptySplitError`,
    printed as ``error: ...``), 130 on Ctrl-C (what arrived is kept); any other CTIQAError propagates to the
    dispatcher (exit 2)."""
    budget = args.thinking_budget
    opts = BuildOptions(
        ldctiqa=args.ldctiqa, teacher=args.teacher, out=args.out, push_to_hub=args.push_to_hub, public=args.public,
        model=args.model, base_url=args.base_url, split=args.split, seed=args.seed, format=args.format,
        encoding=args.encoding, unit_is_hu=args.unit_is_hu, concurrency=args.concurrency, cache=args.cache,
        max_output_tokens=args.max_output_tokens, thinking_budget=None if budget is not None and budget < 0 else budget,
        temperature=args.temperature, timeout_s=args.timeout, max_attempts=args.max_attempts, limit=args.limit,
        retry_failed=args.retry_failed, test_rationales=args.test_rationales, min_words=args.min_words,
        price_input=args.price_input, price_output=args.price_output, progress=args.progress, batch=args.batch,
        batch_poll_s=args.batch_poll, max_shard_bytes=int(args.max_shard_mb * 1e6), reask=args.reask,
        overwrite=args.overwrite)
    try:
        build_dataset(opts)
    except EmptySplitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: answers that arrived are in the cache and open batch jobs in the job log; re-run the "
              "same command to resume", file=sys.stderr)
        return 130
    return 0
