"""``ctiqa predict``: score your own CT — DICOM files, DICOM series folders, TIFF or PNG/JPEG files.

Each input is one *series*: a folder is read as a DICOM series (slices ordered along the slice normal,
:func:`ctiqa.imaging.read_dicom_folder`; a folder holding several series, told apart by Series Instance UID, gives
one series each, ``ID#1``, ``ID#2``... with a note on stderr), a multi-frame DICOM or multi-page TIFF gives one
slice per frame, any other file is a series of one slice. Every slice is rendered with :func:`ctiqa.imaging.render` (the encoding the
model was trained with) and scored by :func:`ctiqa.inference.predict_images`:

* per slice: the parsed score of the generated answer, the probability score and its spread, the rationale
  (``--score-only`` skips generation and reads the score from one forward pass);
* per series: mean and minimum score and the worst slices (the score used is the probability score when the
  model has one, else the parsed score).

Privacy: outputs name a series by the id the user chose (``--id``) or the path the user typed, and a slice by its
index in the series; no DICOM metadata (names, UIDs, dates) is read into the output. File names are left out
unless asked for (``--file-names``): exported DICOM files are often named by their SOP Instance UID. Unreadable inputs are reported
on stderr (naming the file) and skipped; the batch goes on.

Without ``--model``/``--adapter`` the model trained by ``make demo`` (``runs/demo/model``) is used, offline.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.imaging import ENCODINGS, CTImage, read_ct_frames, read_dicom_folder, render
from ctiqa.prompts import DEFAULT_TARGET_FORMAT, TARGET_FORMATS

#: The model ``make demo`` trains (used when no model is given).
DEMO_MODEL = Path(__file__).resolve().parent.parent / "runs" / "demo" / "model"
#: How many lowest-scoring slices a series summary lists.
N_WORST = 3


@dataclass
class Series:
    """One series: ``id`` (user-chosen or the path as typed), its slices in order, the file of each slice (relative
    to the input folder, or the input path; ``#N`` for frame N), and per-file read errors."""

    id: str
    slices: list[CTImage] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def gather_series(inputs: list[str], ids: list[str] | None = None) -> list[Series]:
    """Read every input into a :class:`Series`; unreadable files become ``errors`` instead of exceptions.

    Args:
        inputs: paths of DICOM/TIFF/PNG/JPEG files or DICOM series folders.
        ids: optional user-chosen series ids, one per input (default: the path as given).
    Returns:
        one :class:`Series` per input, except a folder holding k > 1 DICOM series (by Series Instance UID), which
        gives k, with ids ``ID#1`` ... ``ID#k`` (a note on stderr says so; the UIDs themselves are not used).
    Raises:
        CTIQAError: ``ids`` given with a different length than ``inputs``.
    """
    if ids is not None and len(ids) != len(inputs):
        raise CTIQAError(f"--id given {len(ids)} times for {len(inputs)} inputs: give one id per input or none")
    out = []
    for i, raw in enumerate(inputs):
        sid = ids[i] if ids else raw
        p = Path(raw)
        errors: list[tuple[str, str]] = []
        try:
            if p.is_dir():
                found = read_dicom_folder(p, errors=errors)
                if len(found) > 1:
                    print(f"note: {raw} holds {len(found)} DICOM series (different Series Instance UIDs); scored "
                          f"separately as {sid}#1 .. {sid}#{len(found)}", file=sys.stderr)
                group = [Series(id=f"{sid}#{k}" if len(found) > 1 else sid, slices=[img for _, img in sl],
                                files=[name for name, _ in sl]) for k, sl in enumerate(found, start=1)]
                group[0].errors = errors
                out.extend(group)
                continue
            frames = read_ct_frames(p)
            out.append(Series(id=sid, slices=frames, files=[raw + img.source[len(str(p)):] for img in frames]))
        except CTIQAError as e:
            out.append(Series(id=sid, errors=[*errors, (raw, str(e))]))
    return out


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarise(series_id: str, rows: list[dict[str, Any]], n_worst: int = N_WORST, n_skipped: int = 0
              ) -> dict[str, Any]:
    """Per-series summary of slice rows (as written by :func:`predict`): n, mean, min and the worst slices.

    The score of a slice is its ``prob_score`` when present, else its ``parsed_score``; slices with neither are
    counted in ``n_unscored``. ``mean``/``min`` are None when no slice has a score. ``n_skipped``: files or slices
    of the series that could not be read or rendered (named on stderr). A worst slice carries its ``file`` when
    the rows do (``--file-names``).
    """
    scored = [(r, s) for r in rows if (s := _finite(r.get("prob_score"))
                                       if r.get("prob_score") is not None
                                       else _finite(r.get("parsed_score"))) is not None]
    vals = [v for _, v in scored]
    worst = sorted(scored, key=lambda t: t[1])[:n_worst]
    return {
        "series": series_id,
        "n_slices": len(rows),
        "n_unscored": len(rows) - len(scored),
        "n_skipped": n_skipped,
        "mean": round(sum(vals) / len(vals), 4) if vals else None,
        "min": round(min(vals), 4) if vals else None,
        "worst_slices": [{"slice": r["slice"], **({"file": r["file"]} if "file" in r else {}),
                          "score": round(v, 4)} for r, v in worst],
    }


def _print_skipped(s: Series) -> None:
    for path, msg in s.errors:
        print(f"skipped {path}: {msg}", file=sys.stderr)


def predict(series: list[Series], lm: Any, *, fmt: str, encoding: str, score_only: bool, batch_size: int,
            max_new_tokens: int, unit_is_hu: bool = False, file_names: bool = False
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score every slice of every series.

    Returns:
        (slice rows, series summaries). A slice row: ``series``, ``slice`` (0-based index), ``file`` (only with
        ``file_names``), ``parsed_score``, ``parse_rule``, ``prob_score``, ``prob_std`` (0-4 scale), ``rationale``
        (the generated text; None with ``score_only``). A slice that cannot be rendered is reported on stderr and
        skipped.
    """
    from tqdm.auto import tqdm

    from ctiqa.inference import predict_images

    slice_rows: list[dict[str, Any]] = []
    summaries = []
    total = sum(len(s.slices) for s in series)
    bar = tqdm(total=total, desc="scoring slices", unit="slice", disable=total == 0)
    for s in series:
        rows = []
        for start in range(0, len(s.slices), batch_size):
            chunk = list(enumerate(s.slices[start:start + batch_size], start=start))
            images, idx = [], []
            for i, img in chunk:
                try:
                    images.append(render(img, encoding, unit_is_hu=unit_is_hu))
                    idx.append(i)
                except CTIQAError as e:
                    s.errors.append((img.source, str(e)))
            preds = predict_images(lm, images, fmt=fmt, generate=not score_only, probability=True,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size) if images else []
            for i, p in zip(idx, preds, strict=True):
                rows.append({"series": s.id, "slice": i, **({"file": s.files[i]} if file_names else {}),
                             "parsed_score": p.parsed_score, "parse_rule": p.parse_rule,
                             "prob_score": p.prob_score, "prob_std": p.prob_std, "rationale": p.text})
            bar.update(len(chunk))
        _print_skipped(s)
        slice_rows.extend(rows)
        if s.slices or rows:
            summaries.append(summarise(s.id, rows, n_skipped=len(s.errors)))
    bar.close()
    return slice_rows, summaries


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL (``.jsonl``/``.json``) or CSV (``.csv``; list values JSON-encoded).

    Raises:
        CTIQAError: another suffix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jsonl", ".json"):
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, allow_nan=False) + "\n")
    elif path.suffix == ".csv":
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    else:
        raise CTIQAError(f"{path}: output must end in .jsonl or .csv")


def _print_tables(slice_rows: list[dict[str, Any]], summaries: list[dict[str, Any]], score_only: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(x: Any) -> str:
        return "—" if x is None else f"{x:.2f}"

    console = Console()
    t = Table(title="per slice")
    has_files = any("file" in r for r in slice_rows)
    for c in ("series", "slice") + (("file",) if has_files else ()) + ("parsed", "prob ± std") + (
            () if score_only else ("rationale",)):
        t.add_column(c)
    for r in slice_rows:
        cells = [str(r["series"]), str(r["slice"]), *([str(r.get("file", ""))] if has_files else []),
                 f(r["parsed_score"]),
                 f"{f(r['prob_score'])} ± {f(r['prob_std'])}"]
        if not score_only:
            text = (r["rationale"] or "").replace("\n", " ")
            cells.append(text[:100] + ("…" if len(text) > 100 else ""))
        t.add_row(*cells)
    console.print(t)
    t = Table(title="per series")
    for c in ("series", "slices", "skipped", "mean", "min", "worst slices"):
        t.add_column(c)
    for s in summaries:
        t.add_row(str(s["series"]), str(s["n_slices"]), str(s["n_skipped"]), f(s["mean"]), f(s["min"]),
                  ", ".join(f"{w['slice']}{' ' + w['file'] if 'file' in w else ''} ({w['score']:.2f})"
                            for w in s["worst_slices"]))
    console.print(t)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ctiqa predict``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="DICOM file, folder holding one DICOM series, TIFF or PNG/JPEG file")
    parser.add_argument("--model", help="base model Hub id or folder (default: the model `make demo` trained, "
                        "or the adapter's base model)")
    parser.add_argument("--adapter", help="PEFT adapter Hub id or folder (as pushed by recipes/sft.py)")
    parser.add_argument("--out", type=Path, help="write slice rows to FILE.jsonl or FILE.csv; the per-series "
                        "summary goes to FILE.series.jsonl / .csv beside it")
    parser.add_argument("--score-only", action="store_true",
                        help="no rationale: read scores from token probabilities in one forward pass")
    parser.add_argument("--html", type=Path, metavar="FILE.html",
                        help="also write one self-contained HTML report (images embedded; opens offline)")
    parser.add_argument("--id", action="append", dest="ids", metavar="ID",
                        help="series id to report instead of the path (repeat once per input)")
    parser.add_argument("--file-names", action="store_true",
                        help="add each slice's file (relative to its input folder) to the outputs; off by default "
                        "because exported DICOM files are often named by their SOP Instance UID")
    parser.add_argument("--format", default=DEFAULT_TARGET_FORMAT, choices=TARGET_FORMATS,
                        help="the target format the model was trained with")
    parser.add_argument("--encoding", default="soft-tissue", choices=ENCODINGS,
                        help="RGB encoding the model was trained with")
    parser.add_argument("--unit-is-hu", action="store_true",
                        help="treat [0,1] LDCTIQA-style images as W350/L40-windowed HU (for medgemma-3window)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "4bit"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)


def cli_main(args: argparse.Namespace) -> int:
    """Run ``ctiqa predict``. Exit 0 when at least one slice was scored, 1 when nothing could be scored."""
    from ctiqa.inference import load_model

    model, adapter = args.model, args.adapter
    if model is None and adapter is None:
        if not DEMO_MODEL.exists():
            raise CTIQAError(f"no --model given and no demo model at {DEMO_MODEL}: run `make demo` first or pass "
                             "--model/--adapter")
        model = str(DEMO_MODEL)
    if args.out is not None and args.out.suffix not in (".jsonl", ".json", ".csv"):
        raise CTIQAError(f"{args.out}: output must end in .jsonl or .csv")
    if args.html is not None:
        from ctiqa.html_report import check_html_path, write_predict_report

        check_html_path(args.html)
    series = gather_series(args.inputs, args.ids)
    if not any(s.slices for s in series):  # nothing readable: say so without loading a model
        for s in series:
            _print_skipped(s)
        print("nothing to score: no input could be read", file=sys.stderr)
        return 1
    lm = load_model(model, adapter, precision=args.precision)
    slice_rows, summaries = predict(series, lm, fmt=args.format, encoding=args.encoding,
                                    score_only=args.score_only, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, unit_is_hu=args.unit_is_hu,
                                    file_names=args.file_names)
    _print_tables(slice_rows, summaries, args.score_only)
    if args.out is not None:
        write_rows(args.out, slice_rows)
        write_rows(args.out.with_name(args.out.stem + ".series" + args.out.suffix), summaries)
        print(f"wrote {args.out} and {args.out.stem}.series{args.out.suffix}")
    if args.html is not None:
        write_predict_report(args.html, slice_rows, summaries, series, encoding=args.encoding,
                             unit_is_hu=args.unit_is_hu, model=" + ".join(filter(None, (lm.model_id, lm.adapter))))
        print(f"wrote {args.html}")
    n_err = sum(len(s.errors) for s in series)
    if n_err:
        print(f"{n_err} input(s) skipped (see above)", file=sys.stderr)
    return 0 if slice_rows else 1
