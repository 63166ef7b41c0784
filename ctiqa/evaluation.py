"""``ctiqa evaluate``: one harness for every model, with the same prompt, decoding, parser and metrics.

Three sources of predictions:

* a local or Hub model (``--model ID_OR_DIR [--adapter DIR]``): greedy generation with the training prompt, parsed
  by :mod:`ctiqa.scoring`, plus the probability score (:mod:`ctiqa.inference`); ``--score-only`` skips generation;
* a zero-shot API baseline (``--api gemini --model gemini-2.5-flash``, ``--api openai --model gpt-4o`` or any
  OpenAI-compatible server with ``--base-url``): the same student instruction (no true score), temperature 0, the
  same parser (``GEMINI_API_KEY`` / ``OPENAI_API_KEY`` from the environment). ``--teacher gemini`` is the old,
  deprecated name of ``--api gemini``;
* a predictions file (``--predictions FILE.jsonl``): rows with ``id``, ``score`` and either ``prediction`` (a
  number in [0, 4] or null) or ``text`` (parsed); with ``--dataset`` the true scores and the ids to expect come
  from the dataset split (an id with no row counts as a missing prediction). NaN, infinities, booleans and values
  outside [0, 4] are refused up front, naming the line.

Failures are counted by kind in ``results.json`` (``failures``): ``connection`` (timeouts, refused or dropped
connections), ``api`` (an answer refused or cut by the API: HTTP errors, blocked prompts, token limits),
``no_score`` (an answer without a readable 0-4 score) and ``missing`` (no prediction for an id). A run in which no
sample has a usable score (server unreachable, empty file) writes its results and exits 1.

Outputs in ``--out``: ``predictions.jsonl`` (one row per sample: id, score, parsed_score, parse_rule, prob_score,
prob_std, prob_mass, text, ...; written as batches finish, so a re-run with the same settings resumes and a paid
Gemini answer is never asked twice), ``results.json`` (metrics of the parsed and the probability score from the
``ctiqa_iqa`` evaluate module with bootstrap intervals, parse-rule counts, the explanation check on simulated data,
provenance; strict JSON), ``scatter.png`` and ``bland_altman.png``; a short table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.model_settings import (
    DATASET_FINGERPRINT_PREFIX,
    PRECISIONS,
    RUN_CONFIG_FILE,
    choose_encoding,
    dataset_encoding,
    dataset_fingerprint,
    weights_fingerprint,
)
from ctiqa.paths import (
    atomic_write,
    check_dataset_finished,
    check_output_path,
    check_outside_dataset,
    is_local_path,
    lock_output,
    move_aside,
)
from ctiqa.prompts import DEFAULT_TARGET_FORMAT, PROMPT_VERSION, TARGET_FORMATS, instruction
from ctiqa.scale import SCORE_MAX, SCORE_MIN, in_scale

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "ctiqa_iqa"
RESULTS_FILE, PREDICTIONS_FILE = "results.json", "predictions.jsonl"
_NUMBER = {"type": ["number", "null"]}
_INTERVAL = {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
_COUNT = {"type": ["integer", "null"], "minimum": 0}
_KIND = {"type": "object", "properties": {
    **{k: _NUMBER for k in ("srcc", "plcc", "krcc", "overall", "mae", "rmse", "parse_failure_rate", "confidence")},
    **{f"{k}_ci": _INTERVAL for k in ("srcc", "plcc", "krcc", "overall", "mae", "rmse")},
    **{k: _COUNT for k in ("n", "n_valid", "n_missing", "n_bootstrap")},
    "warnings": {"type": "array", "items": {"type": "string"}}}}
#: JSON Schema of the ``results.json`` fields that ``ctiqa report`` and ``ctiqa html`` read (others may be added).
RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "required": ["metrics"],
    "properties": {
        "metrics": {"type": "object", "properties": {"parsed": _KIND, "probability": _KIND},
                    "additionalProperties": _KIND},
        "name": {"type": ["string", "null"]}, "dataset": {"type": ["string", "null"]},
        "split": {"type": ["string", "null"]}, "primary_score": {"type": ["string", "null"]},
        "counts": {"type": ["object", "null"], "properties": {k: _COUNT for k in ("n", "n_split")}},
        "files": {"type": ["object", "null"], "properties": {"predictions_sha256": {"type": ["string", "null"]}}},
    },
}
PLOT_FILES = {"scatter": "scatter.png", "bland_altman": "bland_altman.png"}
_PACKAGES = ("ctiqa", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "evaluate",
             "scipy", "numpy", "google-genai", "trl")


@dataclass
class Sample:
    """One evaluation sample: ``id`` (LDCTIQA file stem), true ``score`` (0-4), the rendered RGB ``image`` (None
    when not loaded) and simulation metadata (``dose_fraction``, ``n_views``) when the dataset has it."""

    id: str
    score: float
    image: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- data
def load_samples(dataset: str, split: str = "test", *, limit: int | None = None, images: bool = True,
                 sizes: dict[str, int] | None = None) -> tuple[list[Sample], str | None]:
    """Read one split of a ctiqa dataset (Hub id, Hub-layout folder, or a ``save_to_disk`` folder).

    Args:
        dataset: what ``datasets.load_dataset`` accepts (a local folder written by ``ctiqa build-dataset``).
        split: split name. limit: keep the first ``limit`` rows. images: decode the first image of each row.
        sizes: when given, ``sizes["n_split"]`` is set to the number of rows in the split (before ``limit``).
    Returns:
        (samples, target_format of the dataset or None).
    Raises:
        CTIQAError: the dataset or split cannot be read, or lacks the ``id`` / ``score`` / ``images`` columns.
    """
    import datasets

    check_dataset_finished(dataset)
    try:
        if (Path(dataset) / "dataset_dict.json").exists():
            dsd = datasets.load_from_disk(dataset)
            if split not in dsd:
                raise KeyError(split)
            ds = dsd[split]
        else:
            ds = datasets.load_dataset(dataset, split=split)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise CTIQAError(f"dataset {dataset}: cannot read split {split!r}: {e}") from e
    need = ["id", "score"] + (["images"] if images else [])
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise CTIQAError(f"dataset {dataset} split {split}: missing column(s) {', '.join(missing)} "
                         f"(has {', '.join(ds.column_names)})")
    if sizes is not None:
        sizes["n_split"] = len(ds)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if not images and "images" in ds.column_names:
        ds = ds.remove_columns("images")
    fmt = ds[0]["target_format"] if len(ds) and "target_format" in ds.column_names else None
    out = []
    for row in ds:
        meta = {k: row[k] for k in ("dose_fraction", "n_views", "noise_sigma_hu", "base_slice")
                if row.get(k) is not None}
        img = None
        if images:
            if not row["images"]:
                raise CTIQAError(f"dataset {dataset} split {split}: row {row['id']} has no image")
            img = row["images"][0].convert("RGB")
        out.append(Sample(str(row["id"]), float(row["score"]), img, meta))
    if len({s.id for s in out}) != len(out):
        raise CTIQAError(f"dataset {dataset} split {split}: ids are not unique")
    return out, fmt


def read_predictions_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a predictions JSONL: ``id``, optional ``score``, and ``prediction`` (number or null) or ``text``.
    A ``ctiqa evaluate`` output is one too: a row it wrote from a given prediction holds it as ``parsed_score`` with
    ``parse_rule`` "given" and no text.

    Every number (``prediction``, ``score``, ``prob_score``, ``parsed_score``) must be a finite number in [0, 4] (``prob_std``: finite
    and >= 0); ``text`` a string or null. Checked for the whole file before any work.

    Raises:
        CTIQAError: unreadable or empty file, a bad JSON line, a row without id / prediction-or-text, or a value
            that is NaN, infinite, a boolean, a string or outside [0, 4] (names the file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise CTIQAError(f"predictions file {p} does not exist")
    rows = []
    scale = f"a number in [{SCORE_MIN:g}, {SCORE_MAX:g}]"
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CTIQAError(f"{p} line {n}: not JSON ({e.msg})") from e
        if not isinstance(row, dict) or "id" not in row or not ("prediction" in row or "text" in row):
            raise CTIQAError(f"{p} line {n}: a row needs 'id' and 'prediction' or 'text'")
        for key in ("prediction", "score", "prob_score", "parsed_score"):
            v = row.get(key)
            if (v is not None or key == "score" and "score" in row) and not in_scale(v):
                what = "or null " if key != "score" else ""
                raise CTIQAError(f"{p} line {n}: {key!r} must be {scale} {what}(true scores and predictions are on "
                                 f"the 0-4 scale), got {json.dumps(v)}")
        std = row.get("prob_std")
        if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std)
                                or std < 0):
            raise CTIQAError(f"{p} line {n}: 'prob_std' must be a finite number >= 0 or null, got {json.dumps(std)}")
        if row.get("text") is not None and not isinstance(row["text"], str):
            raise CTIQAError(f"{p} line {n}: 'text' must be a string or null, got {json.dumps(row['text'])[:40]}")
        rows.append(row)
    if not rows:
        raise CTIQAError(f"predictions file {p} holds no rows: nothing to evaluate")
    return rows


# ---------------------------------------------------------------------------------------------------- records
def make_record(sample: Sample, **fields: Any) -> dict[str, Any]:
    """One ``predictions.jsonl`` row: the sample's id and true score, every prediction field (None unless given
    in ``fields``) and the sample's degradation metadata (dose fraction, views, noise sigma in HU)."""
    rec = {"id": sample.id, "score": sample.score, "parsed_score": None, "parse_rule": None, "prob_score": None,
           "prob_std": None, "prob_mass": None, "prob_decimal_mass": None, "prob_digits": None, "text": None}
    rec.update(fields)
    rec.update({k: v for k, v in sample.meta.items() if k in ("dose_fraction", "n_views", "noise_sigma_hu")})
    return rec


def run_key(settings: dict[str, Any]) -> str:
    """Hash of the settings that change a row's content (``limit`` only selects rows, so it is left out)."""
    content = {k: v for k, v in settings.items() if k != "limit"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


#: Call failures worth asking again on a re-run (transient); other failures (blocked, MAX_TOKENS...) are final.
_RETRY_ERRORS = ("timeout", "connection_error", "http_")


def load_done_rows(path: Path, key: str, samples: Iterable[Sample] = ()) -> dict[str, dict[str, Any]]:
    """Finished rows of an earlier run with the same settings (rows with a transient call error are not).

    Raises:
        CTIQAError: a row's reference score differs from its sample's in ``samples``: the dataset at the same path
            was rebuilt with other labels, and resuming would score new labels against old predictions' rows.
    """
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if row.get("run_key") == key and not str(row.get("error") or "").startswith(_RETRY_ERRORS):
            done[row["id"]] = row
    changed = [(s.id, done[s.id].get("score"), s.score) for s in samples
               if s.id in done and not (isinstance(done[s.id].get("score"), (int, float))
                                        and abs(done[s.id]["score"] - s.score) < 1e-9)]
    if changed:
        i, then, now = changed[0]
        raise CTIQAError(f"--out {path.parent}: {len(changed)} of its rows were scored against other reference scores "
                         f"(id {i}: {then} then, {now} now): the dataset has changed since; nothing was changed. Give "
                         "another --out, or --overwrite to move the old evaluation aside")
    return done


class PredictionsAppender:
    """Appends rows to ``predictions.jsonl`` as they are produced (flushed), keeping earlier rows of this run."""

    def __init__(self, path: Path, key: str, keep: Iterable[dict[str, Any]]):
        self.path, self.key = path, key
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and any(f'"run_key": "{key}"' not in line for line in path.read_text().splitlines()):
            # rows of a run with other settings (maybe paid for): keep them aside, never silently delete them
            move_aside([path], "run", why=f"{path} held rows of a run with other settings")
        with atomic_write(path) as f:  # a kill while rewriting keeps the old rows
            for row in keep:
                f.write(json.dumps(row) + "\n")

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "run_key": self.key}) + "\n")
            f.flush()


# ---------------------------------------------------------------------------------------------------- sources
def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr counting ``total`` images (use as a context manager)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)


def append_scored(samples: list[Sample], todo: list[Sample], done: dict[str, dict[str, Any]], path: Path,
                  key: str, *, desc: str, batch_size: int,
                  score: Callable[[list[Sample]], list[dict[str, Any]]]) -> float:
    """Score ``todo`` in batches and append each batch's rows to ``path`` (``predictions.jsonl``) as it is done.

    Args:
        samples: every sample of the run (the rows of ``done`` among them are kept in the file, in this order).
        todo: the samples still to score. done: finished rows by id (:func:`load_done_rows`); the new rows are
            added to it. key: the run key (:func:`run_key`).
        score: ``score(chunk)`` -> one dict of :func:`make_record` fields per sample of ``chunk``.
    Returns:
        seconds per image of the scoring (s).
    """
    writer = PredictionsAppender(path, key, [done[s.id] for s in samples if s.id in done])
    t0 = time.perf_counter()
    with progress_bar(len(todo), desc) as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            rows = [make_record(s, **p) for s, p in zip(chunk, score(chunk), strict=True)]
            for r in rows:
                done[r["id"]] = {**r, "run_key": key}
            writer.write(rows)
            bar.update(len(chunk))
    return round((time.perf_counter() - t0) / len(todo), 4)


def trained_on_split(model: str | None, dataset: str | None, split: str) -> str | None:
    """A warning when a local model (or adapter) folder was trained on ``split`` of ``dataset``: its training run's
    record (:data:`ctiqa.model_settings.RUN_CONFIG_FILE`, kept beside the model by ``recipes/sft.py`` and
    ``recipes/grpo.py``) names that split as ``dataset_train_split`` and the same dataset: the same content
    (:func:`ctiqa.model_settings.dataset_fingerprint`, so a copy elsewhere counts), or, when the record or the
    dataset has no fingerprint (a Hub id, a record of an older ctiqa), the same folder or Hub id. The recipes now
    refuse to train on the test split, but a model trained on it by an older ctiqa, or on a split of another name,
    would otherwise be reported as if held out.

    Returns:
        the warning, or None (a Hub model, no record, another split or dataset).
    """
    if not model or not dataset or not is_local_path(model):
        return None
    try:
        record = json.loads((Path(model).expanduser() / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("dataset_train_split") != split:
        return None
    recorded, now = record.get("dataset_files"), dataset_fingerprint(dataset)
    if isinstance(recorded, str) and recorded.startswith(DATASET_FINGERPRINT_PREFIX) and now is not None:
        same = recorded == now
    else:
        name = record.get("dataset_name")
        same = isinstance(name, str) and (name == dataset or is_local_path(dataset) and os.path.realpath(
            os.path.expanduser(name)) == os.path.realpath(os.path.expanduser(dataset)))
    if not same:
        return None
    return (f"{model} was trained on split {split!r} of this dataset ({RUN_CONFIG_FILE}: dataset_train_split): "
            "these metrics are not a held-out evaluation")


def predict_with_model(samples: list[Sample], out: Path, *, model: str, adapter: str | None, fmt: str,
                       score_only: bool, max_new_tokens: int, batch_size: int, precision: str,
                       device: str | None, key: str, dataset: str | None = None,
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run a local/Hub model on every sample (resuming from ``out/predictions.jsonl``).

    Returns:
        (records in sample order, model provenance from :meth:`ctiqa.inference.LoadedModel.describe` plus timing).
    """
    from ctiqa.inference import load_model, predict_images

    path = out / PREDICTIONS_FILE
    done = load_done_rows(path, key, samples)
    todo = [s for s in samples if s.id not in done]
    info: dict[str, Any] = {"model": model, "adapter": adapter, "resumed_rows": len(samples) - len(todo)}
    if todo:
        t0 = time.perf_counter()
        lm = load_model(model, adapter, precision=precision, device=device)
        if dataset:  # the dataset's images are rendered already: warn when not in the model's training encoding
            choose_encoding(dataset_encoding(dataset), lm.settings, source="but the dataset's images are")
        info.update(lm.describe())
        info["load_seconds"] = round(time.perf_counter() - t0, 2)

        def score(chunk: list[Sample]) -> list[dict[str, Any]]:
            preds = predict_images(lm, [s.image for s in chunk], fmt=fmt, generate=not score_only,
                                   probability=True, max_new_tokens=max_new_tokens, batch_size=batch_size)
            return [p.to_dict() for p in preds]

        info["seconds_per_image"] = append_scored(samples, todo, done, path, key, desc="evaluate",
                                                  batch_size=batch_size, score=score)
    return [done[s.id] for s in samples], info


#: Zero-shot API baselines (``--api``) and their default model.
APIS = {"gemini": "gemini-2.5-flash", "openai": "gpt-4o"}
#: Call-error codes (:attr:`ctiqa.clients.CallResult.error`) that mean the server was not reached.
CONNECTION_ERRORS = ("timeout", "connection_error")


def api_client(api: str, model: str, *, base_url: str | None = None, thinking_budget: int | None = None,
               retry: Any = None) -> Any:
    """The :mod:`ctiqa.clients` client of a zero-shot baseline, at temperature 0.

    Args:
        api: ``gemini`` (:class:`ctiqa.clients.GeminiClient`, ``GEMINI_API_KEY``) or ``openai``
            (:class:`ctiqa.clients.OpenAICompatClient`, ``OPENAI_API_KEY``; any OpenAI-compatible server with
            ``base_url``). thinking_budget: Gemini only. retry: a :class:`ctiqa.clients.RetryPolicy`.
    Raises:
        CTIQAError: unknown api; ClientConfigError: no API key (Gemini).
    """
    from ctiqa.clients import GeminiClient, OpenAICompatClient

    if api == "gemini":
        return GeminiClient(model, base_url=base_url, temperature=0.0, thinking_budget=thinking_budget, retry=retry)
    if api == "openai":
        return OpenAICompatClient(model, base_url=base_url, temperature=0.0, retry=retry)
    raise CTIQAError(f"unknown --api {api!r}; choose one of {', '.join(APIS)}")


def predict_with_api(samples: list[Sample], out: Path, *, api: str, model: str, fmt: str, key: str,
                     base_url: str | None = None, concurrency: int = 4, thinking_budget: int | None = None,
                     retry: Any = None, client: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Zero-shot through an API: the student instruction :func:`ctiqa.prompts.instruction` with the image, no true
    score, temperature 0, through :func:`api_client` (retries, finish-reason checks). Every answer is appended to
    ``predictions.jsonl`` as it arrives; a failed call (after retries) is recorded with its ``error`` (its text, if
    any, is still parsed); transient failures (timeouts, HTTP errors after the retries) are asked again by the next
    run.

    Args:
        api: ``gemini`` or ``openai`` (recorded in the provenance). client: an already built client with
            ``generate(image, prompt)`` and ``aclose()`` (default: :func:`api_client`).
        retry: a :class:`ctiqa.clients.RetryPolicy` (default: its defaults).
    Returns:
        (records in sample order, provenance with ``failed_calls``).
    Raises:
        CTIQAError (ctiqa.clients.ClientConfigError): no API key, or a fatal API error (bad key, unknown model).
    """
    from ctiqa.scoring import parse_score_detailed

    path = out / PREDICTIONS_FILE
    done = load_done_rows(path, key, samples)
    todo = [s for s in samples if s.id not in done]
    info: dict[str, Any] = {"model": model, "adapter": None, "api": api, "base_url": base_url, "temperature": 0.0,
                            "thinking_budget": thinking_budget if api == "gemini" else None,
                            "resumed_rows": len(samples) - len(todo)}
    results: dict[str, dict[str, Any]] = {}
    if todo:
        client = client or api_client(api, model, base_url=base_url, thinking_budget=thinking_budget, retry=retry)
        writer = PredictionsAppender(path, key, [done[s.id] for s in samples if s.id in done])
        prompt = instruction(fmt)

        async def run_all() -> None:
            sem = asyncio.Semaphore(concurrency)
            with progress_bar(len(todo), f"evaluate {model}") as bar:
                async def one(s: Sample) -> None:
                    async with sem:
                        res = await client.generate(s.image, prompt)
                    parsed = parse_score_detailed(res.text)  # a partial answer (MAX_TOKENS) is parsed too
                    row = make_record(s, text=res.text, parsed_score=parsed.value, parse_rule=parsed.rule,
                                  finish_reason=res.finish_reason, error=res.error)
                    results[s.id] = {**row, "run_key": key}
                    writer.write([row])
                    bar.update(1)

                try:
                    await asyncio.gather(*(one(s) for s in todo))
                finally:
                    await client.aclose()

        asyncio.run(run_all())
    rows = [done.get(s.id) or results[s.id] for s in samples]
    info["failed_calls"] = sum(1 for r in rows if r.get("error"))
    return rows, info


def predictions_from_file(path: str | Path, samples: list[Sample] | None,
                          subset: bool = False) -> list[dict[str, Any]]:
    """Records from a predictions file, aligned to the dataset samples when given (see the module docstring).

    Args:
        subset: ``samples`` is a part of the split (``--limit``): rows for other ids are skipped, not an error.

    Raises:
        CTIQAError: duplicate ids, a row without a true score when no dataset is given, a row whose score
            disagrees with the dataset, or ids absent from the dataset split.
    """
    from ctiqa.scoring import parse_score_detailed

    rows = read_predictions_file(path)
    by_id: dict[str, dict[str, Any]] = {}
    for r in rows:
        rid = str(r["id"])
        if rid in by_id:
            raise CTIQAError(f"{path}: id {rid} appears twice")
        by_id[rid] = r
    if samples is None:
        bad = [rid for rid, r in by_id.items() if not isinstance(r.get("score"), (int, float))]
        if bad:
            raise CTIQAError(f"{path}: rows without a numeric 'score' (true score) and no --dataset: {bad[:5]}")
        samples = [Sample(rid, float(r["score"])) for rid, r in by_id.items()]
    else:
        known = {s.id for s in samples}
        extra = [rid for rid in by_id if rid not in known]
        if extra and not subset:
            raise CTIQAError(f"{path}: {len(extra)} id(s) are not in the dataset split, e.g. {extra[:5]}")
    out = []
    for s in samples:
        r = by_id.get(s.id)
        if r is None:
            out.append(make_record(s, parse_rule="missing"))
            continue
        if isinstance(r.get("score"), (int, float)) and abs(float(r["score"]) - s.score) > 1e-6:
            raise CTIQAError(f"{path}: id {s.id} has score {r['score']} but the dataset says {s.score}")
        if "prediction" in r or (r.get("parse_rule") == "given" and not r.get("text")):
            # an evaluate output of a predictions file holds its given score as parsed_score (rule "given")
            v = r["prediction"] if "prediction" in r else r.get("parsed_score")
            out.append(make_record(s, parsed_score=None if v is None else float(v),
                               parse_rule="given" if v is not None else "missing", text=r.get("text")))
        else:
            p = parse_score_detailed(r["text"])
            out.append(make_record(s, parsed_score=p.value, parse_rule=p.rule, text=r["text"]))
        for k in ("prob_score", "prob_std"):
            if isinstance(r.get(k), (int, float)):
                out[-1][k] = float(r[k])
    return out


# ---------------------------------------------------------------------------------------------------- results
def compute_metrics(records: list[dict[str, Any]], *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics per score kind (``parsed``, ``probability``) via the ``ctiqa_iqa`` evaluate module.

    A kind is present when at least one record has it computed (a ``parsed`` kind needs a parse attempt).
    """
    import evaluate

    metric = evaluate.load(str(METRIC_DIR))
    refs = [r["score"] for r in records]
    kinds = {"parsed": "parsed_score", "probability": "prob_score"}
    out = {}
    for kind, col in kinds.items():
        attempted = any(r.get(col) is not None or (kind == "parsed" and r.get("parse_rule")) for r in records)
        if attempted:
            out[kind] = metric.compute(predictions=[r.get(col) for r in records], references=refs,
                                       n_bootstrap=n_bootstrap, seed=seed)
    return out


def explanation_check(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Rates of :mod:`ctiqa.explanations` over records with simulation metadata and a text; None when none has.
    Adds the per-row verdict to each such record under ``explanation``."""
    from ctiqa.explanations import explanation_rates, truth_rubric

    checks = []
    for r in records:
        if r.get("text") and r.get("dose_fraction") is not None and r.get("n_views") is not None:
            r["explanation"] = truth_rubric(r["text"], float(r["dose_fraction"]), int(r["n_views"]),
                                            r.get("noise_sigma_hu"))
            checks.append(r["explanation"])
    return explanation_rates(checks) if checks else None


def provenance(settings: dict[str, Any], model_info: dict[str, Any] | None) -> dict[str, Any]:
    """Git commit, package versions, settings, model ids, prompt version, timestamp (UTC), command line, and the
    absolute paths of the local model, adapter, dataset or predictions file (``local_paths``: :func:`local_paths`)."""
    from importlib import metadata

    from ctiqa.clients import redact_url  # a --server URL may carry user:password@ or ?token=

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    repo = Path(__file__).resolve().parent.parent
    try:
        if not (repo / "pyproject.toml").is_file():  # an installed copy: the surrounding folder's git is not ours
            raise OSError
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "git_commit": commit, "git_dirty": dirty,
        "packages": {p: version(p) for p in _PACKAGES}, "python": platform.python_version(),
        "prompt_version": PROMPT_VERSION, "settings": settings, "model": model_info,
        "local_paths": local_paths({k: settings.get(k) for k in IDENTITY_KEYS}),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [redact_url(a) for a in (["ctiqa", "evaluate", *sys.argv[2:]] if sys.argv[1:2] == ["evaluate"]
                                             else sys.argv)],
    }


def not_an_evaluation_of(results: dict[str, Any], folder: str | os.PathLike) -> str | None:
    """Why ``results`` (a ``results.json``) is not an evaluation of the weights now in the model or adapter
    ``folder``, or None when it is: a model run (not a predictions file, an API or a server) whose local model or
    adapter is ``folder`` (``provenance.local_paths``) and whose recorded ``model_weights``
    (:func:`ctiqa.model_settings.weights_fingerprint`) are the folder's now. A model card shows only such an
    evaluation: weights re-saved since (more training) or another file's metrics would be presented as this
    model's."""
    if results.get("kind") != "model":
        return f"it evaluated {results.get('kind') or 'something else'} ({results.get('name')}), not a model folder"
    prov = results.get("provenance") or {}
    paths, settings = prov.get("local_paths") or {}, prov.get("settings") or {}
    here = os.path.realpath(folder)
    if here not in (paths.get("model"), paths.get("adapter")):
        return f"it evaluated {paths.get('adapter') or paths.get('model') or settings.get('model')}"
    now = weights_fingerprint(paths.get("model"), paths.get("adapter"))
    if settings.get("model_weights") is None or settings["model_weights"] != now:
        return "it evaluated other weights saved there before (the folder's weights have changed since)"
    return None


def _fmt_ci(m: dict[str, Any], k: str) -> str:
    v, ci = m.get(k), m.get(f"{k}_ci")
    if v is None:
        return "n/a"
    return f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def print_table(results: dict[str, Any]) -> None:
    """A short rich table of the metrics per score kind."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ctiqa evaluate: {results['name']} on {results['dataset'] or 'predictions file'}")
    for col in ("score", "n", "failures", "SRCC", "PLCC", "KRCC", "MAE", "overall"):
        t.add_column(col, justify="left" if col == "score" else "right")
    for kind, m in results["metrics"].items():
        t.add_row(kind, str(m["n"]), str(m["n_missing"]), *(_fmt_ci(m, k) for k in
                                                           ("srcc", "plcc", "krcc", "mae", "overall")))
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(t)
    for kind, m in results["metrics"].items():
        for w in m["warnings"]:
            console.print(f"[yellow]warning[/yellow] ({kind}): {w}")
    f = results.get("failures") or {}
    if any(f.values()):
        console.print("failures: " + ", ".join(f"{n} {what}" for what, n in (
            ("connection (server not reached)", f["connection"]), ("API errors", f["api"]),
            ("answers without a score (parse failures)", f["no_score"]),
            ("missing (no prediction for the id)", f["missing"])) if n))
    from ctiqa.explanations import summary_lines

    for line in summary_lines(results):
        console.print(line)

def finish(records: list[dict[str, Any]], out: Path, *, name: str, kind: str, dataset: str | None,
           split: str | None, settings: dict[str, Any], model_info: dict[str, Any] | None, n_bootstrap: int,
           seed: int, quiet: bool = False, n_split: int | None = None,
           warnings: list[str] | None = None) -> dict[str, Any]:
    """Metrics, explanation check, plots, ``predictions.jsonl`` (final, sample order) and ``results.json``.

    ``n_split``: rows in the dataset split (``counts.n_split``; default ``len(records)``), so that ``ctiqa report``
    can show coverage (scored / in split) of a ``--limit`` run. ``warnings``: about the evaluation as a whole (e.g.
    :func:`trained_on_split`), added to every score kind's ``warnings`` (printed under the table).

    Returns:
        the results dict written to ``results.json``.
    """
    from ctiqa.plots import bland_altman_plot, scatter_plot

    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(records, n_bootstrap=n_bootstrap, seed=seed)
    for m in metrics.values():
        m["warnings"] = [*(warnings or []), *m.get("warnings", [])]
    expl = explanation_check(records)
    from ctiqa.explanations import faithfulness, measured_vs_truth

    faith = faithfulness(records)  # None: no rationale (e.g. the noise-sigma baseline)
    if faith is not None:
        faith["agreement_with_truth_rubric"] = measured_vs_truth(records)
    consistency = None
    if any(r.get("text") for r in records):
        from ctiqa.explanations import quality_consistency

        consistency = quality_consistency([(r.get("parsed_score"), r.get("text")) for r in records])
    preds = {k: [r.get(c) for r in records] for k, c in (("parsed", "parsed_score"), ("probability", "prob_score"))
             if k in metrics}
    true = [r["score"] for r in records]
    plots = {}
    if preds:
        title = f"{name} ({dataset or 'predictions'}{'/' + split if split else ''})"
        plots["scatter"] = scatter_plot(true, preds, out / PLOT_FILES["scatter"], title, metrics).name
        plots["bland_altman"] = bland_altman_plot(true, preds, out / PLOT_FILES["bland_altman"], title).name
    lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)  # fails before touching the file
    with atomic_write(out / PREDICTIONS_FILE) as f:
        f.write(lines)
    primary = "probability" if (metrics.get("probability") or {}).get("n_valid") else "parsed"
    results = {
        "ctiqa_results_version": 1, "name": name, "kind": kind, "dataset": dataset, "split": split,
        "primary_score": primary if metrics else None, "metrics": metrics,
        "parse_rules": dict(Counter(r.get("parse_rule") for r in records if r.get("parse_rule"))),
        "explanation_check": expl,
        "rationale_consistency": consistency,
        "faithfulness": faith,
        "counts": {"n": len(records), "n_split": len(records) if n_split is None else n_split,
                   **{f"{k}_valid": m["n_valid"] for k, m in metrics.items()}},
        "failures": count_failures(records),
        "files": {"predictions": PREDICTIONS_FILE, "plots": plots,
                  # what the metrics were computed from: a reader refuses a predictions.jsonl changed since
                  "predictions_sha256": hashlib.sha256(lines.encode("utf-8")).hexdigest()},
        "provenance": provenance(settings, model_info),
    }
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    with atomic_write(out / RESULTS_FILE) as f:  # a kill never leaves a cut results.json (the run's record)
        f.write(text)
    if not quiet:
        print_table(results)
        print(f"wrote {out / RESULTS_FILE}, {out / PREDICTIONS_FILE}, " + ", ".join(str(out / p) for p in plots.values()))
    return results


def count_failures(records: list[dict[str, Any]]) -> dict[str, int]:
    """Samples without a parsed score, by cause: ``connection`` (the server was not reached:
    :data:`CONNECTION_ERRORS`), ``api`` (another call error: HTTP status, blocked prompt, token limit...),
    ``no_score`` (an answer came back but holds no 0-4 score, or one outside it) and ``missing`` (no prediction
    for the id). A record with a probability score but no parsed one (``--score-only``) is not a failure."""
    out = dict.fromkeys(("connection", "api", "no_score", "missing"), 0)
    for r in records:
        if r.get("parsed_score") is not None or (r.get("prob_score") is not None and r.get("text") is None
                                                 and not r.get("error")):
            continue
        err = str(r.get("error") or "")
        if err:
            out["connection" if err.startswith(CONNECTION_ERRORS) else "api"] += 1
        elif r.get("parse_rule") in ("missing", None):
            out["missing"] += 1
        else:
            out["no_score"] += 1
    return out


def usable(results: dict[str, Any]) -> bool:
    """True when at least one sample has a usable score of some kind."""
    return any((m or {}).get("n_valid") for m in results["metrics"].values())


# ---------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ctiqa evaluate``."""
    from ctiqa.cli import non_negative_int

    parser.description = ("Score a model, a zero-shot API model or a predictions file against the true scores, with "
                          "one prompt, decoding, parser and metric module for all.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = """examples:
  ctiqa evaluate --model google/medgemma-4b-it --adapter runs/medgemma-qlora --dataset DATA --out runs/eval/ft
  ctiqa evaluate --model runs/demo/model --dataset runs/demo/dataset --split test --out runs/demo
  ctiqa evaluate --model google/medgemma-4b-it --dataset DATA --out runs/eval/zero-shot --max-new-tokens 768
  ctiqa evaluate --api gemini --model gemini-2.5-flash --dataset DATA --out runs/eval/gemini-flash
  ctiqa evaluate --api openai --model gpt-4o --dataset DATA --out runs/eval/gpt-4o
  ctiqa evaluate --predictions baseline.jsonl --dataset DATA --out runs/eval/baseline
writes results.json, predictions.jsonl, scatter.png, bland_altman.png in --out; a re-run resumes."""
    src = parser.add_argument_group("what to evaluate (one of)")
    src.add_argument("--model", help="model Hub id or folder (an adapter folder works too); with --api: the API's "
                                     "model id (default " + ", ".join(f"{a}: {m}" for a, m in APIS.items()) + ")")
    src.add_argument("--adapter", help="PEFT adapter folder or Hub id (its base model unless --model is given)")
    src.add_argument("--api", choices=list(APIS), help="zero-shot baseline through an API instead of a local model "
                     "(openai: any OpenAI-compatible server with --base-url; parsed scores only). A model of yours "
                     "served by vLLM or transformers serve: use --server (adds the probability score and an answer "
                     "cache)")
    src.add_argument("--teacher", choices=["gemini"], help="deprecated name of --api gemini")
    src.add_argument("--predictions", type=Path, help="JSONL with id, score and prediction or text")
    parser.add_argument("--dataset", help="dataset Hub id or folder (ctiqa build-dataset output)")
    parser.add_argument("--split", default="test", help="dataset split (default test)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--name", help="name shown in tables (default: model, adapter or file name)")
    parser.add_argument("--format", choices=TARGET_FORMATS,
                        help="the model's answer format (default: the dataset's target_format, else score-first)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation budget (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward/generate batch (default 4)")
    parser.add_argument("--score-only", action="store_true", help="probability score only: no generation")
    parser.add_argument("--limit", type=int, help="evaluate the first N samples only")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="weights: auto (as the model was trained, from its ctiqa_training.json; else bf16 on "
                        "GPU, fp32 on CPU), fp32, bf16, or 4bit NF4")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--base-url", help="API root (a proxy, test server or OpenAI-compatible server); default "
                        "Google's / OpenAI's")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel API requests (default 4)")
    parser.add_argument("--thinking-budget", type=int, default=None,
                        help="Gemini thinking tokens (default: the model's dynamic budget)")
    parser.add_argument("--html", nargs="?", const="", metavar="FILE.html",
                        help="also write a self-contained HTML report (default OUT/report.html): per-sample table "
                        "sortable by error, images, plots")
    parser.add_argument("--server", metavar="URL", help="score through an OpenAI-compatible inference server (vLLM, "
                        "transformers serve) at URL; --model is the served model name (ctiqa.serving)")
    parser.add_argument("--overwrite", action="store_true", help="--out holds the evaluation of another model, "
                        "dataset or split: move its results.json and predictions.jsonl aside (.bak) and start over "
                        "(without it such a run is refused)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples for 95%% intervals")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default 0)")


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa evaluate``: see the module docstring. Returns 0, or 1 when no sample got a usable score."""
    if args.teacher:
        if args.api and args.api != args.teacher:
            raise CTIQAError(f"--teacher {args.teacher} and --api {args.api} disagree; give --api only")
        print(f"warning: --teacher {args.teacher} is deprecated (it runs a zero-shot baseline, not a teacher); use "
              f"--api {args.teacher}", file=sys.stderr)
        args.api = args.teacher
    modes = [m for m, on in (("predictions", args.predictions), ("api", args.api),
                             ("model", (args.model or args.adapter) and not args.api)) if on]
    if len(modes) != 1:
        raise CTIQAError("give exactly one of --model/--adapter, --api gemini|openai, or --predictions")
    mode = modes[0]
    if mode != "predictions" and not args.dataset:
        raise CTIQAError(f"--dataset is required to evaluate {'an API model' if mode == 'api' else 'a model'}")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.concurrency < 1:
        raise CTIQAError("--batch-size, --concurrency and --limit must be positive")
    check_output_path(args.out, folder=True, ours=True, inputs=[args.predictions], writes=[RESULTS_FILE,
                      PREDICTIONS_FILE], hint="Give a folder for results.json, predictions.jsonl and plots")
    check_outside_dataset(args.out, args.dataset)
    lock = lock_output(Path(args.out), "ctiqa evaluate")  # two evaluations into one --out would replace each other
    try:
        return _evaluate(args, mode)
    finally:
        lock.release()


def _evaluate(args: argparse.Namespace, mode: str) -> int:
    """:func:`cli_main` once the options are checked and ``--out`` is locked."""
    # the same file or folder as the previous run in --out, spelt otherwise, is recorded (and its rows keyed) as then
    spelt = _identity(args, mode)
    check_previous_run(args.out, spelt, args.overwrite, args.limit)
    if args.html is not None:
        from ctiqa.html_report import check_html_path

        check_html_path(args.html or args.out / "report.html")
        if args.html:  # like --out: a page inside a dataset folder would join the dataset (and its Hub upload)
            check_outside_dataset(Path(args.html).parent, args.dataset, what="--html")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}  # n_split, filled by load_samples

    if mode == "predictions":
        has_text = any(r.get("text") for r in read_predictions_file(args.predictions))  # every row checked first
        samples = load_samples(args.dataset, args.split, limit=args.limit, images=has_text,
                               sizes=sizes)[0] if args.dataset else None  # images: measured findings
        records = predictions_from_file(args.predictions, samples, subset=args.limit is not None)
        records = records[:args.limit] if args.limit else records
        settings = {"source": spelt["source"], "source_sha256": spelt["source_sha256"], "dataset": spelt["dataset"],
                    "split": args.split if args.dataset else None, "limit": args.limit}
        return _done(records, out, args, name=args.name or args.predictions.stem, kind="predictions",
                     settings=settings, model_info=None, n_split=sizes.get("n_split"), samples=samples)

    samples, ds_fmt = load_samples(args.dataset, args.split, limit=args.limit, sizes=sizes)
    model_fmt = None
    if mode == "model" and not args.server:  # a local model is asked in the format it was trained on, as predict does
        from ctiqa.inference import trained_settings_of

        trained = trained_settings_of(args.adapter or args.model)
        model_fmt = trained.target_format if trained is not None else None
    fmt = args.format or model_fmt or ds_fmt or DEFAULT_TARGET_FORMAT
    if not args.format and model_fmt and ds_fmt and model_fmt != ds_fmt:
        print(f"note: the model was trained on {model_fmt} answers, the dataset holds {ds_fmt}: it is asked for "
              f"{model_fmt} (--format to choose)", file=sys.stderr)
    if args.score_only:
        from ctiqa.inference import check_score_only

        check_score_only(fmt)
    if args.server:  # an OpenAI-compatible inference server
        from ctiqa.serving import evaluate_cli

        kw = evaluate_cli(argparse.Namespace(**{**vars(args), "dataset": spelt["dataset"]}), samples, fmt, out)
        return _done(kw.pop("records"), out, args, n_split=sizes.get("n_split"), samples=samples, **kw)
    if mode == "api":
        model = args.model or APIS[args.api]
        decoding = {"temperature": 0.0, **({"thinking_budget": args.thinking_budget} if args.api == "gemini" else {})}
        settings = {"source": args.api, "model": model, "format": fmt, "prompt_version": PROMPT_VERSION,
                    "decoding": decoding, "dataset": spelt["dataset"], "split": args.split, "limit": args.limit,
                    **({"base_url": args.base_url} if args.api != "gemini" else {})}
        records, info = predict_with_api(samples, out, api=args.api, model=model, fmt=fmt, key=run_key(settings),
                                         base_url=args.base_url, concurrency=args.concurrency,
                                         thinking_budget=args.thinking_budget)
        return _done(records, out, args, name=args.name or f"{model} (zero-shot)", kind=args.api,
                     settings=settings, model_info=info, n_split=sizes.get("n_split"), samples=samples)

    settings = {"source": "model", "model": spelt["model"], "adapter": spelt["adapter"],
                **({"model_weights": spelt["model_weights"]} if spelt["model_weights"] else {}), "format": fmt,
                "prompt_version": PROMPT_VERSION, "precision": args.precision,
                "decoding": {"do_sample": False, "max_new_tokens": args.max_new_tokens,
                             "generate": not args.score_only, "probability_score": True},
                "batch_size": args.batch_size, "dataset": spelt["dataset"], "split": args.split, "limit": args.limit}
    records, info = predict_with_model(samples, out, model=args.model, adapter=args.adapter, fmt=fmt,
                                       score_only=args.score_only, max_new_tokens=args.max_new_tokens,
                                       batch_size=args.batch_size, precision=args.precision, device=args.device,
                                       key=run_key(settings), dataset=args.dataset)
    name = args.name or Path(str(args.adapter or args.model)).name
    seen = [w for w in (trained_on_split(m, args.dataset, args.split) for m in (args.adapter, args.model)) if w]
    return _done(records, out, args, name=name, kind="model", settings=settings, model_info=info,
                 n_split=sizes.get("n_split"), samples=samples, warnings=seen[:1])


#: The settings that name what an evaluation folder holds: a re-run into it with others is refused (#62).
#: ``model_weights``: :func:`ctiqa.model_settings.weights_fingerprint` of a local model run's model/adapter folders
#: (None otherwise; results.json written before it was recorded resume as before, unchecked).
#: ``source_sha256``: the sha256 of a ``--predictions`` file (None otherwise; likewise not compared when not recorded).
IDENTITY_KEYS = ("source", "source_sha256", "model", "adapter", "model_weights", "dataset", "split")


def _identity(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The :data:`IDENTITY_KEYS` of this run, as ``provenance.settings`` in its ``results.json`` will hold them."""
    source = str(args.predictions) if mode == "predictions" else "server" if args.server else \
        args.api if mode == "api" else "model"
    model = None if mode == "predictions" else (args.model or APIS[args.api]) if mode == "api" else args.model
    local = mode == "model" and not args.server
    digest = hashlib.sha256(Path(args.predictions).read_bytes()).hexdigest() if mode == "predictions" and \
        Path(args.predictions).is_file() else None
    return {"source": source, "source_sha256": digest, "model": model, "adapter": args.adapter if local else None,
            "model_weights": weights_fingerprint(args.model, args.adapter) if local else None,
            "dataset": args.dataset, "split": args.split if args.dataset else None}


def _is_path(key: str, identity: dict[str, Any]) -> bool:
    """Whether ``identity[key]`` names a local file or folder (:func:`ctiqa.paths.is_local_path`): the dataset, a
    predictions file (``source``), and a local run's model and adapter; Hub ids and API/served model names are not."""
    v = identity.get(key)
    if not isinstance(v, str) or not v:
        return False
    if key == "source":
        return v not in ("model", "server", *APIS)
    if key in ("model", "adapter") and identity.get("source") != "model":
        return False
    return is_local_path(v)


def _absolute(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def local_paths(identity: dict[str, Any]) -> dict[str, str]:
    """The absolute, symlink-resolved paths of the :data:`IDENTITY_KEYS` that name local files or folders, e.g.
    ``{"dataset": "/data/ds", "model": "/runs/m"}`` (recorded in ``provenance.local_paths`` so that a later run
    that spells them otherwise, from any folder, is recognised as the same run)."""
    return {k: _absolute(identity[k]) for k in IDENTITY_KEYS if _is_path(k, identity)}


def _identity_diff(before: dict[str, Any], paths_before: dict[str, str], identity: dict[str, Any]) -> list[str]:
    """What differs between an earlier run's settings and this run's identity: local paths by their resolved path
    (``paths_before``: the earlier run's recorded ones; results written before they were recorded are resolved
    from here), Hub ids and names as strings."""
    diff = []
    for k in IDENTITY_KEYS:
        then, now = before.get(k), identity[k]
        if k == "model_weights":  # not recorded (written before it was): not compared
            if k in before and then != now:
                diff.append(f"model weights: changed since the rows in {RESULTS_FILE} were scored, the model or "
                            "adapter folder re-saved or replaced")
        elif k == "source_sha256":  # likewise: an edited predictions file at the same path is another run
            if then and now and then != now:
                diff.append(f"predictions file: its content changed since {RESULTS_FILE} was computed from it")
        elif _is_path(k, identity) and (k in paths_before or _is_path(k, before)):
            then_abs = paths_before.get(k) or _absolute(then)
            if then_abs != _absolute(now):
                diff.append(f"{k}: {then_abs!r} then, {_absolute(now)!r} now")
        elif then != now:
            diff.append(f"{k}: {then!r} then, {now!r} now")
    return diff


def _first_line_has(path: Path, key: str) -> bool:
    """True when the first line of the JSONL ``path`` is a JSON object with ``key`` (a row ctiqa wrote)."""
    try:
        with open(path, encoding="utf-8") as f:
            row = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and key in row


def check_previous_run(out: Path, identity: dict[str, Any], overwrite: bool, limit: int | None = None) -> None:
    """Refuse, before any work, an ``--out`` that holds the evaluation of another run (its ``results.json`` names
    another source, model, adapter, dataset or split, or the local model/adapter folder's weights changed since
    (``model_weights``, :func:`ctiqa.model_settings.weights_fingerprint`); or it holds results/predictions ctiqa
    cannot read as an evaluation). Local files and folders are compared by their resolved path (``./ds``, ``ds``,
    ``/abs/ds`` and a symlink to it are one dataset), Hub ids as strings. With ``overwrite``, that evaluation's ``results.json`` and
    ``predictions.jsonl`` are moved aside (``NAME.<UTC time>.bak.EXT``, said on stderr), never deleted. The same run
    resumes (rows of other decoding settings in ``predictions.jsonl`` are moved aside by
    :class:`PredictionsAppender`); a ``limit`` smaller than the samples it already evaluated is refused too (the
    folder would be rewritten with the subset). When it is the same run, ``identity`` takes the spelling of each
    path recorded then where it names the same file from here (so that the rows keyed by it resume).

    Raises:
        CTIQAError: another run's evaluation is there and ``overwrite`` is false; the message names what differs.
    """
    from ctiqa.serving import ANSWERS_FILE

    res, pred = out / RESULTS_FILE, out / PREDICTIONS_FILE
    theirs = [n for n in PLOT_FILES.values() if (out / n).exists()] if not res.exists() else []
    if theirs:  # plots ctiqa did not write (no evaluation here): the run would replace them
        raise CTIQAError(f"--out {out}: holds {', '.join(theirs)} that no ctiqa evaluation wrote; nothing was "
                         "changed. Give another --out")
    if pred.exists() and pred.stat().st_size and not _first_line_has(pred, "parse_rule"):  # make_record's rows
        raise CTIQAError(f"--out {out}: holds a {pred.name} that no ctiqa evaluation wrote; nothing was changed. Give "
                         "another --out")
    if not res.exists() and not (pred.exists() and identity["source"] not in ("model", "api", "server")):
        if overwrite:
            move_aside([pred, out / ANSWERS_FILE], "evaluation")
        return  # nothing, or rows a model/API/server run resumes from or moves aside itself
    try:
        previous = json.loads(res.read_text())
        before = previous["provenance"]["settings"]
        diff = _identity_diff(before, previous["provenance"].get("local_paths") or {}, identity)
        n_before = int((previous.get("counts") or {}).get("n") or 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        diff, n_before = [f"{res.name if res.exists() else pred.name} not from a `ctiqa evaluate` of these settings"], 0
    else:
        for k in IDENTITY_KEYS:  # the same file or folder spelt otherwise: keep the spelling its rows are keyed by
            then = before.get(k)  # (when it names that file from here too: settings are resolved from here)
            if not diff and isinstance(then, str) and then != identity[k] and _is_path(k, identity) \
                    and _absolute(then) == _absolute(identity[k]):
                identity[k] = then
        if not diff and "model_weights" not in before:  # written before weights were recorded: resume its rows
            identity["model_weights"] = None  # (keyed without them) as before
    # the same run with a smaller --limit would rewrite the folder with its subset: the rest would be lost
    if not diff and limit is not None and n_before > limit:
        if not overwrite:
            raise CTIQAError(f"--out {out}: holds this run's evaluation of {n_before} samples; --limit {limit} would "
                             f"rewrite it with {limit}; nothing was changed. Give another --out, or --overwrite to "
                             "move its results.json and predictions.jsonl aside")
        diff = [f"{n_before} samples then, --limit {limit} now"]
    if not diff and not overwrite:
        return
    if diff and not overwrite:
        raise CTIQAError(f"--out {out}: holds the evaluation of another run ({'; '.join(diff)}); nothing was "
                         "changed. Give another --out, or --overwrite to move its results.json and predictions.jsonl "
                         "aside")
    move_aside([res, pred, out / ANSWERS_FILE], "evaluation")  # the answers of a server run are that run's too


def _done(records: list[dict[str, Any]], out: Path, args: argparse.Namespace,
          samples: list[Sample] | None = None, **kw: Any) -> int:
    if samples:  # measured findings of each rationale's image (ctiqa.findings), for the faithfulness check
        from ctiqa.findings import attach_findings

        attach_findings(records, {s.id: s.image for s in samples if s.image is not None})
    results = finish(records, out, dataset=args.dataset, split=args.split if args.dataset else None,
                     n_bootstrap=args.bootstrap, seed=args.seed, **kw)
    if getattr(args, "html", None) is not None:
        from ctiqa.html_report import write_evaluation_report

        print(f"wrote {write_evaluation_report(out, args.html or None)}")
    if not usable(results):
        f = results["failures"]
        print(f"error: no sample has a usable score ({len(records)} samples: {f['connection']} connection "
              f"failures, {f['api']} API errors, {f['no_score']} answers without a score, {f['missing']} missing); "
              f"see {out / PREDICTIONS_FILE}", file=sys.stderr)
        return 1
    return 0
