"""``ctiqa build-dataset``: LDCTIQA (or a simulated mini-LDCTIQA) + a teacher -> chat-format DatasetDict.

Steps, top to bottom:

1. Read the data (:func:`ctiqa.ldctiqa.load_ldctiqa`), split it (:func:`ctiqa.ldctiqa.split_ids`), render every
   image once with :func:`ctiqa.imaging.render` (the student's exact pixels) and PNG-encode it.
2. Ask the teacher for a rationale for every train/validation image (test too with ``--test-rationales``; the
   paper needs none for evaluation, and skipping them saves a tenth of the cost; ``--format score-only`` asks
   no teacher at all). Remote answers go through the :class:`~datasets_builder.cache.AnswerCache`: finished
   items are never asked again, also after ``kill -9``; failed ones are asked again unless
   ``--no-retry-failed``.
3. Check every rationale (:mod:`datasets_builder.checks`); rows whose request failed or whose rationale was
   rejected are left out and listed in ``audit.csv``.
4. Build the ``DatasetDict`` (schema: notes/common.md), write a Hub-layout folder
   (``data/<split>-0000i-of-0000N.parquet`` + ``README.md`` + ``audit.csv``) exactly as
   ``DatasetDict.push_to_hub`` lays out a repo, and with ``--push-to-hub`` upload that folder (one commit).

Memory: the PNG bytes of all images stay in memory (about 0.3 GB per 1,000 LDCTIQA 512x512 slices).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import shutil
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ctiqa import CTIQAError
from ctiqa.clients import SOURCE_PNG_KEY, CallResult, RetryPolicy, Usage, png_bytes, price_for
from ctiqa.ldctiqa import SPLIT_METHODS

from . import checks
from .cache import AnswerCache, cache_key, default_cache_path, image_sha256
from .teachers import TEACHERS, Teacher, make_teacher

SPLITS = ("train", "validation", "test")
NO_TEACHER = "none"


# --------------------------------------------------------------------------------------------------- items
@dataclass
class Item:
    """One image of the build: id, split, true score, degradation metadata (simulated data) and its PNG."""

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
                 progress: bool = True) -> None:
    """Render + PNG-encode every item (threads; PIL's zlib releases the GIL) and fill ``png`` and ``sha``."""
    from ctiqa.imaging import render

    def one(item: Item) -> None:
        im = render(data.image_path(item.id), encoding)
        item.png, item.sha = png_bytes(im), image_sha256(im)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        from tqdm.auto import tqdm

        list(tqdm(pool.map(one, items), total=len(items), desc="render", disable=not progress, file=sys.stderr))


# --------------------------------------------------------------------------------------------------- teacher runs
@dataclass
class RunStats:
    """What a teacher run did: answers from the cache, new calls (ok / failed), tokens of the new calls."""

    cached_ok: int = 0
    cached_failed: int = 0
    called: int = 0
    new_ok: int = 0
    new_failed: int = 0
    usage_new: Usage = field(default_factory=Usage)


async def annotate(items: list[Item], teacher: Teacher, cache: AnswerCache | None, *, concurrency: int = 8,
                   retry_failed: bool = True, prompt_version: str, progress: bool = True) -> RunStats:
    """Fill ``item.result`` for every item: from the cache when finished, else by asking ``teacher``.

    At most ``concurrency`` requests are in flight. Each answer is appended to ``cache`` (when the teacher is
    cacheable) the moment it arrives. A :class:`~ctiqa.clients.ClientConfigError` cancels the
    other requests and propagates; answers that arrived before it are already on disk.
    """
    stats = RunStats()
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
    if not todo:
        return stats

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
                cache.append(item.key, res, image_sha256=item.sha, prompt_version=prompt_version,
                             teacher=teacher.model_id, score=item.score, id=item.id)
            stats.called += 1
            stats.usage_new = stats.usage_new + res.usage
            if res.ok:
                stats.new_ok += 1
            else:
                stats.new_failed += 1
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


# --------------------------------------------------------------------------------------------------- dataset
def features(synthetic: bool) -> Any:
    """The ``datasets.Features`` of the schema in notes/common.md (``score`` float64: no float32 rounding)."""
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
    return Features(f)


def make_row(item: Item, fmt: str, rationale: str, teacher_id: str, synthetic: bool) -> dict[str, Any]:
    """One dataset row. Without a rationale the completion holds the score line only."""
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
    return row


def assemble(items: list[Item], fmt: str, teacher_id: str, synthetic: bool, rationale_splits: tuple[str, ...],
             min_words: int = checks.MIN_WORDS) -> Any:
    """Check rationales, set ``item.status`` and build the ``DatasetDict``.

    Status: ``kept`` (row with rationale), ``no_rationale`` (row without: score-only format or a split without
    rationales), ``failed`` (teacher request failed: left out), ``rejected`` (rationale rejected: left out).
    """
    from datasets import Dataset, DatasetDict

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
        teacher_score = (res.parsed or {}).get("score")
        item.check = checks.check_rationale(res.rationale or "", item.score,
                                            teacher_score if isinstance(teacher_score, (int, float)) else None,
                                            min_words=min_words)
        if not item.check.ok:
            item.status = "rejected"
            continue
        item.status = "kept"
        rows[item.split].append(make_row(item, fmt, item.check.text, teacher_id, synthetic))
    feats = features(synthetic)
    return DatasetDict({s: Dataset.from_list(rows[s], features=feats) for s in SPLITS})


AUDIT_COLUMNS = ("id", "split", "score", "status", "reasons", "evidence", "failure", "finish_reason", "attempts",
                 "words", *checks.ARTIFACT_TERMS)


def write_audit(items: list[Item], path: Path) -> None:
    """``audit.csv``: one row per image: status, rejection reasons and evidence, failure, artifact-term counts."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=AUDIT_COLUMNS)
        w.writeheader()
        for it in items:
            res, chk = it.result, it.check
            w.writerow({
                "id": it.id, "split": it.split, "score": it.score, "status": it.status,
                "reasons": ";".join(chk.reasons) if chk else "", "evidence": " | ".join(chk.evidence) if chk else "",
                "failure": (res.error or "") if res is not None and not res.ok else "",
                "finish_reason": (res.finish_reason or "") if res else "", "attempts": res.attempts if res else "",
                "words": chk.words if chk else "", **{t: (chk.terms[t] if chk else "") for t in checks.ARTIFACT_TERMS},
            })


# --------------------------------------------------------------------------------------------------- Hub layout
def write_hub_folder(dsd: Any, out: Path, card_fn: Any, progress: bool = True) -> list[Path]:
    """Write ``dsd`` as the files ``DatasetDict.push_to_hub`` would put in a repo, into the folder ``out``.

    Mirrors datasets' ``_push_parquet_shards_to_hub`` (datasets 5.x): per split, ``num_shards =
    int(nbytes / config.MAX_SHARD_SIZE) + 1``, file names ``data/{split}-{i:05d}-of-{n:05d}.parquet``, media
    bytes embedded with ``embed_table_storage``, row groups of ``get_writer_batch_size_*`` rows. README.md
    YAML (``dataset_info``, ``configs``) is made with the same ``DatasetInfosDict`` / ``MetadataConfigs`` calls.
    ``card_fn(card_data) -> DatasetCard`` adds our card. Old ``data/*.parquet`` files in ``out`` are removed;
    README.md is written last (its presence marks a finished folder). ``progress=False`` silences datasets' bars.

    Returns:
        the written files.
    """
    import datasets

    quiet = not progress and not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return _write_hub_folder(dsd, out, card_fn)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _write_hub_folder(dsd: Any, out: Path, card_fn: Any) -> list[Path]:
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets import config as dconfig
    from datasets.arrow_writer import (
        get_writer_batch_size_from_data_size,
        get_writer_batch_size_from_features,
    )
    from datasets.info import DatasetInfosDict
    from datasets.table import embed_table_storage
    from datasets.utils.metadata import MetadataConfigs
    from datasets.utils.py_utils import convert_file_size_to_int
    from huggingface_hub import DatasetCardData

    out.mkdir(parents=True, exist_ok=True)
    (out / dconfig.REPOCARD_FILENAME).unlink(missing_ok=True)
    data_dir = out / "data"
    if data_dir.exists():
        for old in data_dir.glob("*.parquet"):
            old.unlink()
    data_dir.mkdir(exist_ok=True)
    written: list[Path] = []
    splits = SplitDict()
    download_size = dataset_size = 0
    max_shard = convert_file_size_to_int(dconfig.MAX_SHARD_SIZE)
    features = None
    for split, ds in dsd.items():
        features = ds.features
        nbytes = ds._estimate_nbytes()
        batch = get_writer_batch_size_from_features(ds.features) or get_writer_batch_size_from_data_size(
            len(ds), nbytes)
        n = int(nbytes / max_shard) + 1
        for i in range(n):
            shard = ds.shard(num_shards=n, index=i, contiguous=True)
            fmt = shard.format
            shard = shard.with_format("arrow").map(embed_table_storage, batched=True, batch_size=batch,
                                                   keep_in_memory=True).with_format(**fmt)
            path = data_dir / f"{split}-{i:05d}-of-{n:05d}.parquet"
            shard.to_parquet(str(path), batch_size=batch)
            written.append(path)
            download_size += path.stat().st_size
        splits.add(SplitInfo(name=split, num_bytes=nbytes, num_examples=len(ds)))
        dataset_size += nbytes
    info = DatasetInfo(config_name="default", features=features, splits=splits, download_size=download_size,
                       dataset_size=dataset_size)
    info.size_in_bytes = download_size + dataset_size
    card_data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    MetadataConfigs({"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in dsd]}}
                    ).to_dataset_card_data(card_data)
    card = card_fn(card_data)
    readme = out / dconfig.REPOCARD_FILENAME
    readme.write_text(str(card), encoding="utf-8")
    written.append(readme)
    return written


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Upload a Hub-layout folder to a dataset repo in one commit (create the repo, private unless told).

    Old shards under ``data/`` that are not in ``folder`` are deleted in the same commit. The token comes from
    ``HF_TOKEN`` or ``hf auth login`` and is never printed.

    Returns:
        the commit URL.
    Raises:
        CTIQAError: no token.
    """
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise CTIQAError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                             allow_patterns=["README.md", "audit.csv", "data/*.parquet"],
                             delete_patterns=["data/*"], commit_message="ctiqa build-dataset")
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------------- orchestration
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
    format: str = "score-first"
    encoding: str = "soft-tissue"
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


@dataclass
class BuildResult:
    """What :func:`build_dataset` made: the dataset, per-image items, run stats, provenance, written files."""

    dataset: Any
    items: list[Item]
    stats: RunStats
    provenance: dict[str, Any]
    files: list[Path]
    commit_url: str | None = None


def _usage_of(items: list[Item]) -> Usage:
    total = Usage()
    for it in items:
        if it.result is not None:
            total = total + it.result.usage
    return total


def build_dataset(opts: BuildOptions, teacher: Teacher | None = None) -> BuildResult:
    """Run the whole build (module docstring). ``teacher`` overrides the one named in ``opts`` (tests).

    Raises:
        CTIQAError: bad data folder, unknown split/format/encoding, teacher configuration, no output target.
    """
    import ctiqa
    from ctiqa import prompts
    from ctiqa.imaging import encoding_info
    from ctiqa.ldctiqa import load_ldctiqa, resolve_split_method

    if opts.out is None and opts.push_to_hub is None:
        raise CTIQAError("give --out DIR, --push-to-hub REPO_ID, or both")
    if opts.format not in prompts.TARGET_FORMATS:
        raise CTIQAError(f"unknown --format {opts.format!r}; choose one of {', '.join(prompts.TARGET_FORMATS)}")
    enc = encoding_info(opts.encoding)
    data = load_ldctiqa(opts.ldctiqa)
    split, why = resolve_split_method(data, opts.split)
    print(f"split: {split} ({why})")
    items = plan_items(data, split, opts.seed, opts.limit)
    rationale_splits = ("train", "validation", "test") if opts.test_rationales else ("train", "validation")
    needs_teacher = opts.format != "score-only"
    if needs_teacher and opts.teacher == "template" and teacher is None:
        no_md = [it.id for it in items if (it.metadata or {}).get("dose_fraction") is None]
        if no_md:
            raise CTIQAError(
                f"{opts.ldctiqa}: the template teacher needs degradations.json metadata (dose_fraction, n_views) "
                f"for every image; {len(no_md)} image(s) have none (e.g. {no_md[0]}): real LDCTIQA needs "
                "--teacher gemini or --teacher openai")
    render_items(data, items, opts.encoding, progress=opts.progress)

    stats = RunStats()
    teacher_id = NO_TEACHER
    teacher_kind = "none (score-only format)"
    cache_path = None
    if needs_teacher:
        teacher = teacher or make_teacher(
            opts.teacher, model=opts.model, base_url=opts.base_url, max_output_tokens=opts.max_output_tokens,
            thinking_budget=opts.thinking_budget, temperature=opts.temperature, timeout_s=opts.timeout_s,
            retry=RetryPolicy(max_attempts=opts.max_attempts), seed=opts.seed)
        teacher_id, teacher_kind = teacher.model_id, opts.teacher
        asked = [it for it in items if it.split in rationale_splits]
        cache = None
        if teacher.cacheable:
            cache_path = opts.cache or default_cache_path()
            cache = AnswerCache(cache_path)
            print(f"answer cache: {cache_path}", file=sys.stderr)
        try:
            stats = asyncio.run(_annotate_and_close(asked, teacher, cache, opts, prompts.PROMPT_VERSION))
        finally:
            if cache is not None:
                cache.close()

    dsd = assemble(items, opts.format, teacher_id, data.synthetic, rationale_splits, opts.min_words)

    kept = [it for it in items if it.status == "kept"]
    terms = {t: sum(1 for it in kept if it.check and it.check.terms[t]) for t in checks.ARTIFACT_TERMS}
    rejections = Counter(r for it in items if it.status == "rejected" and it.check for r in it.check.reasons)
    failures = Counter((it.result.reason if it.result else "not_asked") for it in items if it.status == "failed")
    usage = _usage_of([it for it in items if it.split in rationale_splits]) if needs_teacher else Usage()
    price = _price(opts, teacher_id)
    prov = {
        "source": f"{'simulated mini-LDCTIQA (ctiqa simulate)' if data.synthetic else 'LDCTIQA 2023'}, folder "
                  f"`{Path(data.root).name}` ({len(data.ids)} images)",
        "synthetic": data.synthetic, "teacher": teacher_id, "teacher_kind": teacher_kind,
        "prompt_version": prompts.PROMPT_VERSION, "target_format": opts.format, "encoding": enc,
        "split": split, "seed": opts.seed, "counts": {s: len(dsd[s]) for s in SPLITS},
        "rationale_splits": list(rationale_splits) if needs_teacher else [],
        "status": dict(Counter(it.status for it in items)), "rejections": dict(rejections),
        "failures": dict(failures), "terms": terms, "n_rationales": len(kept),
        "usage": {"prompt_tokens": usage.prompt_tokens, "output_tokens": usage.output_tokens,
                  "thoughts_tokens": usage.thoughts_tokens,
                  "cost_usd": usage.cost_usd(*price) if price else None},
        "ctiqa_version": ctiqa.__version__,
    }

    from .card import make_card

    tmp = None
    out = opts.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="ctiqa-dataset-")
        out = Path(tmp)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_audit(items, out / "audit.csv")
        files = write_hub_folder(dsd, out, lambda cd: make_card(prov, cd), progress=opts.progress)
        files.insert(0, out / "audit.csv")
        commit = push_folder(out, opts.push_to_hub, private=not opts.public) if opts.push_to_hub else None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _report(stats, prov, usage, price, opts, teacher_id, out if tmp is None else None, commit, cache_path)
    return BuildResult(dsd, items, stats, prov, files if tmp is None else [], commit)


async def _annotate_and_close(items: list[Item], teacher: Teacher, cache: AnswerCache | None, opts: BuildOptions,
                              prompt_version: str) -> RunStats:
    try:
        return await annotate(items, teacher, cache, concurrency=opts.concurrency, retry_failed=opts.retry_failed,
                              prompt_version=prompt_version, progress=opts.progress)
    finally:
        await teacher.aclose()


def _price(opts: BuildOptions, teacher_id: str) -> tuple[float, float] | None:
    known = price_for(teacher_id)
    if opts.price_input is None and opts.price_output is None:
        return known
    base = known or (0.0, 0.0)
    return (opts.price_input if opts.price_input is not None else base[0],
            opts.price_output if opts.price_output is not None else base[1])


def _report(stats: RunStats, prov: dict[str, Any], usage: Usage, price: tuple[float, float] | None,
            opts: BuildOptions, teacher_id: str, out: Path | None, commit: str | None, cache_path: Path | None) -> None:
    p = print
    p(f"teacher {teacher_id}: {stats.cached_ok} answers from the cache, {stats.called} new calls "
      f"({stats.new_ok} ok, {stats.new_failed} failed), {stats.cached_failed} cached failures not retried")
    if cache_path is not None:  # remote teachers only: the template teacher uses no tokens
        u = stats.usage_new

        def cost(x: Usage) -> str:
            return f"; estimated cost USD {x.cost_usd(*price):.4f}" if price else ""

        p(f"tokens this run: prompt {u.prompt_tokens:,}, output {u.output_tokens:,}, thinking "
          f"{u.thoughts_tokens:,}{cost(u)}")
        p(f"tokens of the dataset's answers (cached included): prompt {usage.prompt_tokens:,}, output "
          f"{usage.output_tokens:,}, thinking {usage.thoughts_tokens:,}{cost(usage)}")
        if price:
            p(f"  prices: USD {price[0]}/1M input, {price[1]}/1M output incl. thinking (ai.google.dev/gemini-api/"
              "docs/pricing, 2025-07; override with --price-input/--price-output)")
    p("rows: " + ", ".join(f"{s} {n}" for s, n in prov["counts"].items())
      + "; status: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["status"].items())))
    if prov["failures"]:
        p("failed requests (left out; re-run to retry): "
          + ", ".join(f"{k} {v}" for k, v in sorted(prov["failures"].items())))
    if prov["rejections"]:
        p("rejected rationales (left out): " + ", ".join(f"{k} {v}" for k, v in sorted(prov["rejections"].items())))
    if out is not None:
        p(f"wrote {out} (data/*.parquet, README.md, audit.csv)")
    if commit:
        p(f"pushed to the Hub: {commit}")


# --------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``ctiqa build-dataset``."""
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
    a("--model", help="teacher model id (gemini default gemini-2.5-pro; openai: the served model name)")
    a("--base-url", help="API root: required for --teacher openai (e.g. http://localhost:8000/v1)")
    a("--split", choices=SPLIT_METHODS, default="auto",
      help="paper (shipped 800/100/100 ids), stratified (seeded 80/10/10), base-slice (simulated data); auto: paper "
           "for the full LDCTIQA training release, base-slice for `ctiqa simulate` output, else stratified. "
           "Default: auto")
    a("--seed", type=int, default=0, help="split seed (stratified, base-slice) and template wording seed")
    a("--format", choices=TARGET_FORMATS, default="score-first", help="target text format. Default: score-first")
    a("--encoding", default="soft-tissue", choices=ENCODINGS,
      help="CT -> RGB encoding (ctiqa.imaging.render). Default: soft-tissue")
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
    a("--price-input", type=float, help="USD per 1M input tokens for the cost estimate")
    a("--price-output", type=float, help="USD per 1M output tokens (thinking included) for the cost estimate")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``ctiqa build-dataset``; returns 0 (CTIQAError propagates to the dispatcher)."""
    budget = args.thinking_budget
    opts = BuildOptions(
        ldctiqa=args.ldctiqa, teacher=args.teacher, out=args.out, push_to_hub=args.push_to_hub, public=args.public,
        model=args.model, base_url=args.base_url, split=args.split, seed=args.seed, format=args.format,
        encoding=args.encoding, concurrency=args.concurrency, cache=args.cache,
        max_output_tokens=args.max_output_tokens, thinking_budget=None if budget is not None and budget < 0 else budget,
        temperature=args.temperature, timeout_s=args.timeout, max_attempts=args.max_attempts, limit=args.limit,
        retry_failed=args.retry_failed, test_rationales=args.test_rationales, min_words=args.min_words,
        price_input=args.price_input, price_output=args.price_output, progress=args.progress)
    build_dataset(opts)
    return 0
