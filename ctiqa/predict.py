"""``ctiqa predict``: score your own CT — DICOM files, DICOM series folders (trees), TIFF or PNG/JPEG files.

Each input is one *series*: a folder (and its sub-folders) is read as DICOM series (slices ordered along the slice
normal, :func:`ctiqa.imaging.index_dicom_folder`; a folder holding several series, told apart by Series Instance
UID, gives one series each, ``ID#1``, ``ID#2``... with a note on stderr); a folder with no DICOM file but TIFF,
PNG or JPEG files directly in it is one series of those, in natural name order (``slice2`` before ``slice10``); a
multi-frame DICOM or multi-page TIFF gives one slice per frame, any other file is a series of one slice. An input
given twice (``A`` and ``./A/``) is scored once. Every slice is rendered with
:func:`ctiqa.imaging.render` (the encoding the model was trained with) and scored by a *backend*:

* per slice: the parsed score of the generated answer, the probability score and its spread, the rationale
  (``--score-only`` skips generation and reads the score from one forward pass);
* per series: mean and minimum score and the worst slices (the score used is the probability score when the
  model has one, else the parsed score), computed from the written rows at the end.

Streaming: folders are indexed from DICOM headers only and each slice's pixels are read when its batch is scored,
so memory stays flat in the number of slices. Each row is appended to ``--out`` as soon as it is scored (with a
progress bar: slices/s, ETA); a killed run keeps what it wrote, and a re-run with the same ``--out`` and settings
skips the slices already there (a different model or setting into the same ``--out`` is refused, naming what
differs: the settings live beside the rows in ``FILE.run.json``). Resume is keyed on content, not on names: each
row holds ``image_sha256`` (:func:`ctiqa.imaging.image_sha256` of the rendered image: no file name, no UID), and
before any scoring every slice already in ``--out`` is read and rendered again; if any differs (files changed,
slices inserted so that positions moved, slices removed) the run is refused naming the series, so stale scores
are never kept or mixed in. Slices added after the last scored position are scored.

Skipped inputs (unreadable files, slices that cannot be rendered) are rows too, with ``skipped`` holding the reason
and no file name; the batch goes on. Privacy: outputs name a series by the id the user chose (``--id``) or the path
the user typed, and a slice by its index in the series; no DICOM metadata (names, UIDs, dates) is read into the
output. File names are left out of the outputs and stderr unless asked for (``--file-names``): exported DICOM
files are often named by their SOP Instance UID.

Backends (:data:`Backend`): a function taking a list of RGB PIL images and returning one dict per image with the
keys of :class:`ctiqa.inference.ImagePrediction` (``text``, ``parsed_score``, ``parse_rule``, ``prob_score``,
``prob_std``; None where not computed), optionally ``error`` (a failed call) and further keys, which are kept in the
row (add them to :data:`ROW_COLUMNS` for CSV). :func:`model_backend` wraps an in-process model; a server backend
plugs into :func:`score_series` the same way.

Without ``--model``/``--adapter`` the model trained by ``make demo`` (``runs/demo/model`` under the current folder:
call it from the checkout where ``make demo`` ran) is used, offline.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError, CTIQAWarning
from ctiqa.clients import redact_url
from ctiqa.demo import DEMO_MODEL
from ctiqa.findings import rationale_fields
from ctiqa.imaging import (
    ENCODINGS,
    IMAGE_SUFFIXES,
    CTImage,
    image_files,
    image_sha256,
    index_dicom_folder,
    is_dicom_file,
    missing_reason,
    names_a_uid,
    read_ct,
    read_ct_frames,
    render,
)
from ctiqa.model_settings import PRECISIONS, choose_encoding, weights_fingerprint
from ctiqa.paths import atomic_write, check_output_path, lock_output
from ctiqa.prompts import DEFAULT_TARGET_FORMAT, TARGET_FORMATS
from ctiqa.scale import in_scale

#: How many lowest-scoring slices a series summary lists.
N_WORST = 3
#: Up to this many slice rows are also printed as a table at the end (more: see --out).
TABLE_MAX = 200
#: Columns of a slice row, in order (``file`` only with ``--file-names``). ``skipped`` holds the reason a slice or
#: input was not scored; ``error`` a failed backend call; ``image_sha256`` the content key a resume checks; the measured findings of the slice and the flags of its
#: rationale (ctiqa.findings.rationale_fields) come with a rationale.
ROW_COLUMNS = ["series", "slice", "file", "image_sha256", "parsed_score", "parse_rule", "prob_score", "prob_std", "rationale",
               "noise_hu", "noise_severity", "streak_index", "streaks", "faithfulness_flags", "skipped", "error"]
SUFFIXES = (".jsonl", ".json", ".csv")

#: A scoring backend: RGB PIL images -> one dict per image (see the module docstring).
Backend = Callable[[list[Any]], list[dict[str, Any]]]


@dataclass
class SliceRef:
    """A slice (or a whole file, ``frame == "all"``) to read when its turn comes: ``index`` in the series, ``name``
    (the file relative to the input folder, or the input path; ``#N`` for frame N), ``path`` and ``frame``
    (None: a single-frame file)."""

    index: int
    name: str
    path: Path
    frame: int | str | None = None


@dataclass
class Series:
    """One series: ``id`` (user-chosen or the path as typed), its slices in order (not yet read) and the files that
    could not even be indexed, as ``(path, message)``."""

    id: str
    refs: list[SliceRef] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def read_slice(self, index: int) -> CTImage | None:
        """Slice ``index`` of the series, read now (None when the series has no such slice).

        Raises:
            CTIQAError: the file cannot be read.
        """
        for ref in self.refs:
            if ref.frame == "all":
                frames = read_ct_frames(ref.path)
                return frames[index] if 0 <= index < len(frames) else None
            if ref.index == index:
                return _read(ref, {})[0][2]
        return None


def check_ids(inputs: list[str], ids: list[str] | None) -> None:
    """Refuse ``--id`` values that cannot name one series per input: a count other than one per input, an empty id,
    or an id given twice (two inputs would be merged into one series and its summary).

    Raises:
        CTIQAError: naming the count or the repeated id.
    """
    if ids is None:
        return
    if len(ids) != len(inputs):
        raise CTIQAError(f"--id given {len(ids)} times for {len(inputs)} inputs: give one id per input or none")
    if any(not i.strip() for i in ids):  # an empty series name in every output, the table and the HTML page
        raise CTIQAError("--id: an empty id; give each input a name")
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise CTIQAError(f"--id {twice[0]!r} given for more than one input: each input needs its own id")


def _spelling_in(known: set[str], raw: str) -> str | None:
    """The series id in ``known`` (ids of rows an earlier run wrote into the same --out) that names the file or
    folder ``raw`` names, spelt otherwise (``s`` and ``s/``, ``./s``, a link to it); ``X#k`` ids of a folder of
    several series match ``X``. None when there is none."""
    try:
        st = os.stat(raw)
    except OSError:
        return None
    for k in sorted(known):
        for cand in dict.fromkeys((k, k.rsplit("#", 1)[0])):
            try:
                other = os.stat(cand)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return cand
    return None


def gather_series(inputs: list[str], ids: list[str] | None = None, *, file_names: bool = False,
                  known: set[str] | None = None) -> list[Series]:
    """Index every input into :class:`Series` without reading pixels (DICOM headers only).

    Args:
        inputs: paths of DICOM/TIFF/PNG/JPEG files, folders (trees) of DICOM files, or folders of TIFF/PNG/JPEG
            slices (:func:`ctiqa.imaging.image_files`). Without ``ids``, an input naming a file or folder given
            before is dropped with a note (:func:`_distinct_inputs`).
        ids: optional user-chosen series ids, one per input (default: the path as given, except a DICOM file
            given directly: ``dicom#K`` for the K-th such input, since its name is often a SOP Instance UID, and a
            path holding a DICOM UID (:func:`ctiqa.imaging.names_a_uid`): ``series#K``; the path with
            ``file_names``).
        file_names: name DICOM file inputs by their path.
        known: series ids of rows already in the --out being resumed: an input that names the same file or
            folder as one of them, spelt otherwise, keeps that id (:func:`_spelling_in`), so the resume finds it.
    Returns:
        one :class:`Series` per input, except a folder holding k > 1 DICOM series (by Series Instance UID), which
        gives k, with ids ``ID#1`` ... ``ID#k`` (a note on stderr says so; the UIDs themselves are not used). An
        input that cannot be read at all is a series without slices whose ``errors`` say why.
    Raises:
        CTIQAError: ``ids`` given with a different length than ``inputs``, or an id given twice
            (:func:`check_ids`); two inputs that would get one series id.
    """
    check_ids(inputs, ids)
    if ids is None:
        inputs = _distinct_inputs(inputs)
    out: list[Series] = []
    source: list[int] = []  # the input each series came from
    n_dicom_files = n_uid_paths = 0
    for i, raw in enumerate(inputs):
        source += [i - 1] * (len(out) - len(source))  # the series the previous input gave
        sid = ids[i] if ids else _printable((known and _spelling_in(known, raw)) or raw)
        p = Path(raw)
        try:
            is_dir, is_file = p.is_dir(), p.is_file()
        except OSError as e:  # e.g. a name too long: this input is skipped, the others are scored
            out.append(Series(id=sid, errors=[(raw, f"{raw}: {e.strerror or e}")]))
            continue
        shown = sid  # how notes name the input: never by a path that may be a UID
        if not ids and not file_names and is_file and is_dicom_file(p):
            n_dicom_files += 1
            sid = shown = f"dicom#{n_dicom_files}"
        elif not ids and not file_names and names_a_uid(raw):  # a PACS export's Study/Series UID folder
            n_uid_paths += 1
            sid = shown = f"series#{n_uid_paths}"
            print(f"note: input {i + 1} is named {sid} (its path holds a DICOM UID; --id ID or --file-names to name "
                  "it)", file=sys.stderr)
        errors: list[tuple[str, str]] = []
        if is_dir:
            try:
                found = index_dicom_folder(p, errors=errors)
            except CTIQAError as e:
                images = image_files(p)
                if not images:
                    out.append(Series(id=sid, errors=[*errors, (raw, str(e))]))
                    continue
                found = [[(f.name, f, None) for f in images]]  # a folder of TIFF/PNG slices, in name order
                kept = []  # other files stay listed; images in sub-folders say why they are not slices here
                for n, m in errors:
                    if Path(n).suffix.lower() not in IMAGE_SUFFIXES:
                        kept.append((n, m))
                    elif Path(n).parent != p:
                        kept.append((n, f"{n}: in a sub-folder of a folder of slices; give that folder as its own "
                                        "input"))
                errors = kept
            if len(found) > 1:
                print(f"note: {shown} holds {len(found)} DICOM series (different Series Instance UIDs); scored "
                      f"separately as {sid}#1 .. {sid}#{len(found)}", file=sys.stderr)
            group = [Series(id=f"{sid}#{k}" if len(found) > 1 else sid,
                            refs=[SliceRef(j, _printable(name), path, frame)
                                  for j, (name, path, frame) in enumerate(sl)])
                     for k, sl in enumerate(found, start=1)]
            group[0].errors = errors
            out.extend(group)
        elif is_file:
            out.append(Series(id=sid, refs=[SliceRef(0, _printable(raw), p, "all")]))
            if sid.startswith("dicom#") and sid != raw:
                print(f"note: DICOM file input {i + 1} is named {sid} (its file name may be a UID; --id ID or "
                      "--file-names to name it)", file=sys.stderr)
        else:
            out.append(Series(id=sid, errors=[(raw, f"{raw}: " + (r if (r := missing_reason(p)) != "no such file" else "no such file or folder"))]))
    source += [len(inputs) - 1] * (len(out) - len(source))
    # Rows, summaries and resume are keyed on the series id: two inputs under one id would be merged (a folder X of
    # two series gives X#1, X#2, and a sibling folder may be named "X#1"; --id S#2 beside --id S).
    first: dict[str, int] = {}
    for s, i in zip(out, source, strict=True):
        if first.setdefault(s.id, i) != i:
            raise CTIQAError(f"inputs {first[s.id] + 1} and {i + 1} would both be scored as series {s.id!r} (a folder "
                             "of k DICOM series is named ID#1 .. ID#k); give each input its own --id")
    return out


def _printable(name: str) -> str:
    """A path as text every output can hold: bytes that are not UTF-8 in a file name (Latin-1 ``é``, which Python
    keeps as lone surrogates and which broke the CSV and HTML writers) are written as ``\\xe9``: two names that
    differ only there stay two names."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _distinct_inputs(inputs: list[str]) -> list[str]:
    """``inputs`` without the ones that name a file or folder given before (``A``, ``./A/``, a link to ``A``): each
    would be scored again as a series of its own. A note on stderr names what was dropped."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for raw in inputs:
        try:
            st = os.stat(raw)
        except OSError:  # missing or unreadable: reported by the caller
            kept.append(raw)
            continue
        if (st.st_dev, st.st_ino) in seen:
            print(f"note: input {raw} was given before; scored once", file=sys.stderr)
            continue
        seen.add((st.st_dev, st.st_ino))
        kept.append(raw)
    return kept


def _reason(message: str, path: str | Path) -> str:
    """A read error without the file's name (which may be a UID): ``"<path>[#N]: why"`` -> ``"why"``."""
    p, name = str(path), Path(path).name
    text = re.sub(rf"^{re.escape(p)}(?:#\d+)?:\s*", "", message).replace(p, "<file>")
    return text.replace(name, "<file>") if len(name) >= 5 else text


# ---------------------------------------------------------------------------------------------------- backends
def model_backend(lm: Any, *, fmt: str, score_only: bool, max_new_tokens: int, batch_size: int) -> Backend:
    """The in-process backend: :func:`ctiqa.inference.predict_images` on a loaded model (greedy answer, parsed
    score, probability score)."""
    from ctiqa.inference import predict_images

    def score(images: list[Any]) -> list[dict[str, Any]]:
        return [p.to_dict() for p in predict_images(lm, images, fmt=fmt, generate=not score_only, probability=True,
                                                    max_new_tokens=max_new_tokens, batch_size=batch_size)]

    return score


# ---------------------------------------------------------------------------------------------------- rows
def _row_columns(file_names: bool) -> list[str]:
    return [c for c in ROW_COLUMNS if file_names or c != "file"]


class RowSink:
    """Slice rows appended to a JSONL or CSV file as they are scored (flushed per row), resumable.

    ``path`` None keeps nothing on disk (rows go to ``on_row`` only). The run's settings are kept beside the rows
    in ``<stem>.run.json``; a re-run with other settings is refused before any work, and a file that holds rows
    but no settings (not written by ``ctiqa predict``) is never overwritten.

    A run holds an exclusive lock on ``path`` (``<path>.lock``, a ``filelock.FileLock``; the empty lock file stays
    and is harmless) until :meth:`close`, so two runs into one file never both write every row. On a resume, rows
    whose scoring failed (:func:`failed_row`: a call error and no score) are not done: they are removed from the
    file (rewritten atomically) and scored again, so each (series, slice) has one row.

    Raises:
        CTIQAError: bad suffix, ``path`` is a folder, its folder cannot be created or written, settings differ,
            another run holds the lock.
    """

    def __init__(self, path: Path | None, settings: dict[str, Any], file_names: bool):
        self.path, self.columns, self.skipped = path, _row_columns(file_names), set()
        self.done: dict[tuple[str, int], str | None] = {}  # (series, slice) -> image_sha256 of the scored image
        self.files: dict[tuple[str, int], str] = {}  # (series, slice) -> its file, in rows written with --file-names
        if path is None:
            return
        if path.is_dir():
            raise CTIQAError(f"--out {path}: is a folder; give a file name such as {path / 'scores.jsonl'}")
        if path.suffix not in SUFFIXES:
            raise CTIQAError(f"--out {path}: must end in .jsonl or .csv")
        self.run_file = path.with_name(path.stem + ".run.json")
        self._lock = lock_output(path, "ctiqa predict")
        try:
            self._open(path, settings)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, path: Path, settings: dict[str, Any]) -> None:
        has_rows = path.is_file() and path.stat().st_size > 0
        if has_rows:
            if not self.run_file.is_file():
                raise CTIQAError(f"--out {path}: exists and was not written by ctiqa predict (no {self.run_file.name})"
                                 "; choose another --out")
            before = json.loads(self.run_file.read_text())
            diff = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)
                    and (k in before or k not in NEWER_SETTINGS)]  # not recorded then: resumes as before
            if diff == ["model_weights"]:  # the same model and adapter names, other weights
                raise CTIQAError(f"--out {path}: model weights: changed since the rows in {path.name} were scored "
                                 "(the model or adapter folder was re-saved or replaced); choose another --out")
            diff = [k for k in diff if k != "model_weights"] or diff  # another model: its name says it
            if diff:
                raise CTIQAError(f"--out {path}: holds rows of a run with other settings ("
                                 + ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in diff)
                                 + "); choose another --out")
            _drop_cut_line(path)
            _drop_failed_rows(path)
            has_rows = path.stat().st_size > 0  # a CSV cut inside its header keeps nothing: write it again
            for n, r in enumerate(self.read(), 1):
                if problem := _not_a_row(r):  # edited by hand or by a spreadsheet since: never resumed as scores
                    raise CTIQAError(f"--out {path}: row {n} {problem}, so it is not a row ctiqa predict wrote (edited "
                                     "since?); nothing was changed. Choose another --out")
                if r.get("skipped"):
                    self.skipped.add((str(r["series"]), str(r.get("slice")), r["skipped"]))
                elif r.get("slice") not in (None, ""):
                    self.done[(str(r["series"]), int(r["slice"]))] = r.get("image_sha256")
                    if r.get("file") not in (None, ""):
                        self.files[(str(r["series"]), int(r["slice"]))] = str(r["file"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", newline="")
            self.run_file.write_text(json.dumps(settings, indent=1) + "\n")
        except OSError as e:
            raise CTIQAError(f"--out {path}: cannot write ({e.strerror or e})") from e
        self._csv = None
        if path.suffix == ".csv":
            self._csv = csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="ignore")
            if not has_rows:
                self._csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._csv is not None:
            self._csv.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
        else:
            self._f.write(json.dumps(row, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self.path is not None:
            self._f.close()
            self._lock.release()

    def read(self) -> Iterator[dict[str, Any]]:
        """The rows in the file (JSONL: a last line cut short by a kill is ignored; CSV: numbers restored)."""
        if self.path is None or not self.path.is_file():
            return
        with open(self.path, newline="", encoding="utf-8-sig") as f:
            if self.path.suffix == ".csv":
                for r in csv.DictReader(f):
                    yield {k: _from_csv(k, v) for k, v in r.items()}
            else:
                for line in f:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue


def _not_a_row(row: Any) -> str | None:
    """Why ``row`` (one read back from --out) is not a slice row as ctiqa predict writes them, or None."""
    if not isinstance(row, dict) or not row.get("series"):
        return "has no 'series'"
    if row.get("slice") not in (None, "") and not isinstance(row["slice"], int):
        return f"has slice {row['slice']!r}, not a whole number"
    for k in ("parsed_score", "prob_score"):
        v = row.get(k)
        if v is not None and not in_scale(v):
            return f"has {k} {v!r}, not a number in [0, 4]"
    return None


def failed_row(row: dict[str, Any]) -> bool:
    """True for a slice row whose scoring failed (HTTP error, timeout, lost connection...): an ``error`` and
    neither a parsed nor a probability score. Such a row is scored again by a resume."""
    return bool(row.get("error")) and row.get("parsed_score") is None and row.get("prob_score") is None


def _redo(row: dict[str, Any]) -> bool:
    """A row a resume does again: a :func:`failed_row`, or a skipped input or slice (the file may have been fixed
    since; one still unreadable is skipped again, with its row)."""
    return failed_row(row) or bool(row.get("skipped"))


def _drop_failed_rows(path: Path) -> None:
    """Remove the rows a resume does again (:func:`_redo`: failed and skipped rows) from a JSONL/CSV row file
    (rewritten with :func:`ctiqa.paths.atomic_write`: a kill leaves the old file whole); nothing is rewritten when
    there are none."""

    def failed(raw: str | list[str], header: list[str] | None) -> bool:
        if header is not None:  # a CSV record
            return _redo({k: _from_csv(k, v) for k, v in zip(header, raw, strict=False)})
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            return False
        return isinstance(row, dict) and _redo(row)

    def records(f: Any) -> tuple[list[str] | None, Iterator[Any]]:
        if path.suffix != ".csv":
            return None, iter(f)
        reader = csv.reader(f)
        return next(reader, None) or [], reader

    with open(path, newline="", encoding="utf-8-sig") as f:
        header, recs = records(f)
        if not any(failed(r, header) for r in recs):
            return
    with open(path, newline="", encoding="utf-8-sig") as f, atomic_write(path, newline="") as g:
        header, recs = records(f)
        writer = csv.writer(g) if header is not None else None
        if writer is not None and header:
            writer.writerow(header)
        for r in recs:
            if not failed(r, header):
                writer.writerow(r) if writer is not None else g.write(r)


def _drop_cut_line(path: Path) -> None:
    """A kill (or a full disk) can leave the last row cut short: drop that fragment, so that it is neither read as a
    row nor glued to the next one. JSONL: the bytes after the last newline. CSV (:func:`_drop_cut_csv_row`): a
    rationale holds newlines inside its quoted field, so the cut is found by parsing. Only called on a file this
    ctiqa predict run owns (its ``.run.json`` matched)."""
    if path.suffix == ".csv":
        _drop_cut_csv_row(path)
        return
    with open(path, "rb+") as f:
        f.seek(0, 2)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        f.truncate(keep)


def _drop_cut_csv_row(path: Path) -> None:
    """Keep the CSV records before a cut one: a record is whole when it parses (``strict``: a quoted field open at
    the end is an error), has the header's number of fields, and the file ends with the row terminator after it.
    Rewritten with :func:`ctiqa.paths.atomic_write` only when something is dropped (two passes: memory flat)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        header, whole = next(reader, None), 0
        try:
            for rec in reader:
                if not rec:  # a blank line (line ends doubled by an editor: \r\r\n): no record, not a cut
                    continue
                if header is None or len(rec) != len(header):
                    break
                whole += 1
            else:
                f.seek(0, 2)
                f.seek(f.tell() - 1)
                if f.read(1) == "\n":
                    return  # every record whole, the last one terminated
                whole -= 1  # the last record's final field may be cut short: no terminator after it
        except csv.Error:
            pass  # a quoted field (a rationale) cut in the middle: drop that record
    with open(path, newline="", encoding="utf-8-sig") as f, atomic_write(path, newline="") as g:
        reader, writer = csv.reader(f), csv.writer(g)
        for k, rec in enumerate(r for r in reader if r):
            if k > whole:
                break
            writer.writerow(rec)


def _from_csv(key: str, value: str | None) -> Any:
    if value in (None, ""):
        return None
    try:
        if key == "slice":  # "0.0": a spreadsheet or pandas re-saved the file with the column as floats
            return int(float(value))
        if key in ("parsed_score", "prob_score", "prob_std"):
            return float(value)
    except ValueError:
        return value  # kept as text: the resume refuses the row (RowSink)
    return value


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _slice_score(r: dict[str, Any]) -> float | None:
    return _finite(r.get("prob_score")) if r.get("prob_score") is not None else _finite(r.get("parsed_score"))


class SeriesSummary:
    """Running per-series summary (n, sum, min, the ``n_worst`` lowest slices): memory flat in the slices."""

    def __init__(self, series_id: str, n_worst: int = N_WORST):
        self.id, self.n_worst = series_id, n_worst
        self.n = self.n_unscored = self.n_skipped = 0
        self.total, self.worst = 0.0, []  # heap of (-score, -slice, entry): the n_worst lowest kept

    def add(self, r: dict[str, Any]) -> None:
        if r.get("skipped"):
            self.n_skipped += 1
            return
        self.n += 1
        v = _slice_score(r)
        if v is None:
            self.n_unscored += 1
            return
        self.total += v
        entry = {"slice": r["slice"], **({"file": r["file"]} if r.get("file") else {}), "score": round(v, 4)}
        item = (-v, -int(r["slice"]), entry)
        if len(self.worst) < self.n_worst:
            heapq.heappush(self.worst, item)
        elif item > self.worst[0]:
            heapq.heapreplace(self.worst, item)

    def result(self) -> dict[str, Any]:
        scored = self.n - self.n_unscored
        worst = [e for _, _, e in sorted(self.worst, reverse=True)]
        return {"series": self.id, "n_slices": self.n, "n_unscored": self.n_unscored, "n_skipped": self.n_skipped,
                "mean": round(self.total / scored, 4) if scored else None,
                "min": worst[0]["score"] if worst else None, "worst_slices": worst}


def summaries_from_rows(rows: Iterable[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """One summary per series id in ``order`` that has rows, from streamed rows (any order; :class:`SeriesSummary`).

    A summary: ``series``, ``n_slices`` (rows that are not skipped), ``n_unscored`` (neither score), ``n_skipped``
    (skipped rows), ``mean`` and ``min`` (None when no slice has a score) and ``worst_slices`` (the
    :data:`N_WORST` lowest: ``slice``, ``score``, and ``file`` when the rows have it). The score of a slice is its
    ``prob_score`` when present, else its ``parsed_score``.
    """
    acc: dict[str, SeriesSummary] = {}
    for r in rows:
        sid = str(r["series"])
        acc.setdefault(sid, SeriesSummary(sid)).add(r)
    return [acc[s].result() for s in order if s in acc]


# ---------------------------------------------------------------------------------------------------- scoring
def _read(ref: SliceRef, cache: dict[str, Any]) -> list[tuple[int, str, CTImage]]:
    """(index, name, image) of a ref; a whole file expands to its frames. One multi-frame file is kept cached."""
    if ref.frame == "all":
        frames = read_ct_frames(ref.path)
        return [(k, ref.name + img.source[len(str(ref.path)):], img) for k, img in enumerate(frames)]
    if ref.frame is None:
        return [(ref.index, ref.name, read_ct(ref.path))]
    if cache.get("path") != ref.path:
        cache.clear()
        cache["path"] = ref.path
        try:
            cache["frames"] = read_ct_frames(ref.path)
        except CTIQAError as e:
            cache["error"] = e
    if "error" in cache:
        raise cache["error"]
    return [(ref.index, ref.name, cache["frames"][int(ref.frame)])]


def check_resume(series: list[Series], sink: RowSink, *, encoding: str, unit_is_hu: bool = False) -> None:
    """Before a resume: read and render again every slice that ``sink`` already holds a row for and compare its
    :func:`ctiqa.imaging.image_sha256` with the row's. Slices past the last scored one (added) are left to score.

    Raises:
        CTIQAError: naming the series (not the files) whose rows are stale: a slice's pixels differ (a file
            changed, or a slice was inserted so that positions moved), its file was renamed (rows written with
            ``--file-names`` name it), a scored slice is gone or unreadable now,
            or the row has no content hash (written by an older ctiqa).
    """
    if not sink.done:
        return
    stale: dict[str, list[int]] = {}
    cache: dict[str, Any] = {}
    for s in series:
        seen: set[int] = set()
        for ref in s.refs:
            if ref.frame != "all" and (s.id, ref.index) not in sink.done:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CTIQAWarning)
                    items = _read(ref, cache)
            except CTIQAError:
                items = []
            for index, name, img in items:
                if (s.id, index) not in sink.done:
                    continue
                seen.add(index)
                if sink.files.get((s.id, index), name) != name:  # renamed: the row would name another file
                    stale.setdefault(s.id, []).append(index)
                    continue
                try:
                    digest = image_sha256(render(img, encoding, unit_is_hu=unit_is_hu))
                except CTIQAError:
                    digest = None
                if digest is None or digest != sink.done[(s.id, index)]:
                    stale.setdefault(s.id, []).append(index)
        gone = [i for (sid, i) in sink.done if sid == s.id and i not in seen]
        if gone:
            stale.setdefault(s.id, []).extend(gone)
    if stale:
        what = "; ".join(f"{sid} (slice{'s' if len(ix) > 1 else ''} {', '.join(map(str, sorted(ix)[:5]))}"
                         f"{' ...' if len(ix) > 5 else ''})" for sid, ix in stale.items())
        raise CTIQAError(f"--out {sink.path}: holds scores of slices whose content has changed since they were scored"
                         f" (pixels differ, slices inserted, removed or renamed, or rows from an older ctiqa without "
                         f"image_sha256): {what}; choose another --out to score them afresh"
                         + ("; DICOM files given directly are named dicom#K by their place among the inputs: give "
                            "the same files in the same order, or --id" if any(k.startswith("dicom#") for k in stale)
                            else ""))


def score_series(series: list[Series], backend: Backend, sink: RowSink, *, encoding: str, batch_size: int,
                 unit_is_hu: bool = False, file_names: bool = False,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, int]:
    """Score every slice not already in ``sink``, writing each row (and each skipped input) as it comes.

    Slices are read and rendered one batch at a time (``batch_size`` images, across series), so memory does not
    grow with the number of slices. Rows already in ``sink`` are first checked against the current content
    (:func:`check_resume`; a changed series raises :class:`ctiqa.CTIQAError` before any scoring). A slice row: ``series``, ``slice`` (0-based), ``file`` (only with
    ``file_names``), ``image_sha256`` (of the rendered image), ``parsed_score``, ``parse_rule``, ``prob_score``, ``prob_std`` (0-4 scale), ``rationale``
    (the generated text; None with score-only) and what else the backend returns; a skipped row: ``series``,
    ``slice`` (None when the file could not be indexed), ``skipped`` (the reason, without the file name).

    Returns:
        counts: ``scored`` (this run, failed ones included), ``resumed`` (already in ``sink``), ``skipped`` (this
        run), ``failed`` (this run's :func:`failed_row` rows; ``first_error`` the first one's error when any).
    """
    from tqdm.auto import tqdm

    check_resume(series, sink, encoding=encoding, unit_is_hu=unit_is_hu)
    counts: dict[str, Any] = {"scored": 0, "resumed": 0, "skipped": 0, "failed": 0}
    pending: list[tuple[str, int, str, Any]] = []
    emit = on_row or (lambda r: None)

    def put(row: dict[str, Any]) -> None:
        sink.write(row)
        emit(row)

    def skip(sid: str, index: int | None, name: str, path: str, message: str) -> None:
        reason = _reason(message, path)
        key = (sid, str(index), reason, path)  # the path: several files may be skipped for one reason
        if key in sink.skipped:  # reported already in this run
            return
        sink.skipped.add(key)
        counts["skipped"] += 1
        where = f"{path}" if file_names else f"{sid}" + (f" slice {index}" if index is not None else "")
        tqdm.write(f"skipped {where}: {reason if not file_names else message}", file=sys.stderr)
        put({"series": sid, "slice": index, **({"file": name} if file_names else {}), "skipped": reason})

    def flush(bar: Any) -> None:
        if not pending:
            return
        preds = backend([img for *_, img in pending])
        if len(preds) != len(pending):
            raise CTIQAError(f"scoring backend returned {len(preds)} results for {len(pending)} images")
        for (sid, index, name, img), p in zip(pending, preds, strict=True):
            extra = {k: v for k, v in p.items() if k not in _PREDICTION_KEYS}
            row = {"series": sid, "slice": index, **({"file": name} if file_names else {}),
                   "image_sha256": image_sha256(img), "parsed_score": p.get("parsed_score"),
                   "parse_rule": p.get("parse_rule"), "prob_score": p.get("prob_score"), "prob_std": p.get("prob_std"),
                   "rationale": p.get("text"), **rationale_fields(img, p.get("text")), **extra}
            put(row)  # measured findings + rationale flags
            counts["scored"] += 1
            if failed_row(row):
                counts["failed"] += 1
                counts.setdefault("first_error", str(row["error"])[:200])
        bar.update(len(pending))
        pending.clear()

    total = sum(len(s.refs) for s in series)
    cache: dict[str, Any] = {}
    with tqdm(total=total, desc="scoring", unit="slice", file=sys.stderr, disable=total == 0) as bar:
        for s in series:
            for path, message in s.errors:
                skip(s.id, None, path, path, message)
            for ref in s.refs:
                if ref.frame != "all" and (s.id, ref.index) in sink.done:
                    counts["resumed"] += 1
                    bar.update(1)
                    continue
                try:
                    with warnings.catch_warnings():  # shown below from img.notes, named like skipped inputs
                        warnings.simplefilter("ignore", CTIQAWarning)
                        items = _read(ref, cache)
                except CTIQAError as e:
                    skip(s.id, None if ref.frame == "all" else ref.index, ref.name, str(ref.path), str(e))
                    bar.update(1)
                    continue
                if ref.frame == "all" and len(items) > 1:
                    bar.total += len(items) - 1
                    bar.refresh()
                for index, name, img in items:
                    if (s.id, index) in sink.done:
                        counts["resumed"] += 1
                        bar.update(1)
                        continue
                    for note in img.notes:  # what reading assumed or clipped (imaging.CTImage.notes)
                        where = str(ref.path) if file_names else f"{s.id} slice {index}"
                        tqdm.write(f"warning {where}: {note if file_names else _reason(note, ref.path)}",
                                   file=sys.stderr)
                    try:
                        image = render(img, encoding, unit_is_hu=unit_is_hu)
                    except CTIQAError as e:
                        skip(s.id, index, name, str(ref.path), str(e))
                        bar.update(1)
                        continue
                    pending.append((s.id, index, name, image))
                    if len(pending) >= batch_size:
                        flush(bar)
        flush(bar)
    return counts


_PREDICTION_KEYS = {"text", "parsed_score", "parse_rule", "prob_score", "prob_std", "prob_mass",
                    "prob_decimal_mass", "prob_digits"}


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL (``.jsonl``/``.json``) or CSV (``.csv``; list values JSON-encoded), atomically.

    Raises:
        CTIQAError: another suffix.
    """
    if path.suffix not in SUFFIXES:
        raise CTIQAError(f"{path}: output must end in .jsonl or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, newline="") as f:
        if path.suffix == ".csv":
            keys = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        else:
            for r in rows:
                f.write(json.dumps(r, allow_nan=False) + "\n")


def _print_tables(slice_rows: list[dict[str, Any]] | None, summaries: list[dict[str, Any]], score_only: bool
                  ) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(x: Any) -> str:
        return "—" if x is None else f"{x:.2f}"

    console = Console()
    if slice_rows:
        t = Table(title="per slice")
        has_files = any("file" in r for r in slice_rows)
        for c in ("series", "slice") + (("file",) if has_files else ()) + ("parsed", "prob ± std") + (
                () if score_only else ("rationale",)):
            t.add_column(c)
        for r in slice_rows:
            cells = [str(r["series"]), "—" if r.get("slice") is None else str(r["slice"]),
                     *([str(r.get("file", ""))] if has_files else [])]
            if r.get("skipped"):
                t.add_row(*cells, "skipped", r["skipped"][:60], *(() if score_only else ("",)))
                continue
            cells += [f(r.get("parsed_score")), f"{f(r.get('prob_score'))} ± {f(r.get('prob_std'))}"]
            if not score_only:
                text = (r.get("rationale") or r.get("error") or "").replace("\n", " ")
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
                        help="DICOM file, folder (tree) of DICOM files, TIFF or PNG/JPEG file, or a folder of TIFF/PNG/"
                        "JPEG slices (natural name order)")
    parser.add_argument("--model", help="base model Hub id or folder (default: runs/demo/model under the current "
                        "folder, the model `make demo` trained; or the adapter's base model)")
    parser.add_argument("--adapter", help="PEFT adapter Hub id or folder (as pushed by recipes/sft.py)")
    parser.add_argument("--out", type=Path, help="write slice rows to FILE.jsonl or FILE.csv as they are scored; the "
                        "per-series summary goes to FILE.series.jsonl / .csv beside it. A re-run with the same --out "
                        "resumes: slices already scored are checked by content (a hash of the rendered image kept "
                        "in each row) and skipped, slices added after them are scored, and if any scored slice "
                        "changed (files replaced, slices inserted or removed) the run is refused naming the series")
    parser.add_argument("--score-only", action="store_true",
                        help="no rationale: read scores from token probabilities in one forward pass")
    parser.add_argument("--html", type=Path, metavar="FILE.html",
                        help="also write one self-contained HTML report (images embedded; opens offline)")
    parser.add_argument("--id", action="append", dest="ids", metavar="ID",
                        help="series id to report instead of the path (repeat once per input)")
    parser.add_argument("--file-names", action="store_true",
                        help="add each slice's file (relative to its input folder) to the outputs and name skipped "
                        "files on stderr; off by default because exported DICOM files are often named by their "
                        "SOP Instance UID")
    parser.add_argument("--format", choices=TARGET_FORMATS,
                        help="the target format the model was trained with (default: the one recorded beside the "
                        f"model in ctiqa_training.json, else {DEFAULT_TARGET_FORMAT})")
    parser.add_argument("--encoding", choices=ENCODINGS,
                        help="RGB encoding to render with (default: the one the model was trained on, recorded in "
                        "ctiqa_training.json, else soft-tissue; forcing another is warned about)")
    parser.add_argument("--unit-is-hu", action="store_true",
                        help="treat [0,1] LDCTIQA-style images as W350/L40-windowed HU (for medgemma-3window)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: as the model was trained (ctiqa_training.json), else bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--server", metavar="URL", help="score through an OpenAI-compatible inference server (vLLM, "
                        "transformers serve) at URL instead of loading the model; --model is the served model name")
    parser.add_argument("--concurrency", type=int, default=8, help="with --server: requests in flight (default 8)")


def _companions(out: Path) -> tuple[Path, Path, Path]:
    """The files ``ctiqa predict --out FILE.ext`` writes beside FILE.ext: ``FILE.run.json`` (the run's settings,
    :func:`_settings`), ``FILE.series.ext`` (the per-series summaries, :func:`summaries_from_rows`) and, with
    ``--server``, ``FILE.answers.jsonl`` (the run's server answer log, :mod:`ctiqa.serving`)."""
    return (out.with_name(out.stem + ".run.json"), out.with_name(out.stem + ".series" + out.suffix),
            out.with_name(out.stem + ".answers.jsonl"))


def _first_row(path: Path) -> dict[str, Any] | None:
    """The first row of a JSON / JSONL / CSV file as a dict (CSV: its header names as keys), or None."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                return dict.fromkeys(next(csv.reader(f), []))
            text = f.read() if path.suffix == ".json" else f.readline()
        row = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def check_companions(out: Path) -> None:
    """Refuse, before any work, an ``--out`` whose companion files (:func:`_companions`) exist and were not written
    by ``ctiqa predict``: a ``.run.json`` that is not a settings record, a ``.series`` file whose first row is not
    a series summary, an ``.answers.jsonl`` whose first row is not a server answer. A run replaces or appends to
    them, so a user's file of that name would be lost.

    Also refused: an ``--out`` whose name differs from an existing row file only in its suffix (``S.csv`` beside
    ``S.jsonl``): both would share ``S.run.json`` and ``S.answers.jsonl``, and a run into one would rewrite the
    other's record, so a resume of the other could keep rows of another model.

    Raises:
        CTIQAError: naming the companion (or sibling) file; nothing is changed.
    """
    run_file, series_file, answers_file = _companions(out)
    for sibling in (out.with_suffix(s) for s in SUFFIXES if s != out.suffix):
        if sibling.exists() or sibling.is_symlink():
            raise CTIQAError(f"--out {out}: {sibling.name} exists beside it and would share its companion files "
                             f"({run_file.name}, {answers_file.name}); choose another --out name")
    settings_keys = {"model", "adapter", "format", "encoding", "score_only"}
    summary_keys = {"series", "n_slices", "n_unscored", "n_skipped"}
    for path, keys in ((run_file, settings_keys), (series_file, summary_keys), (answers_file, {"key", "result"})):
        check_output_path(path, what=f"--out {out}: its companion", ours=lambda p, k=keys: _has_keys(p, k),
                          hint="choose another --out")


def _has_keys(path: Path, keys: set[str]) -> bool:
    """True when the first row of ``path`` has all ``keys``, or the file is blank (a CSV of no summaries)."""
    row = _first_row(path)
    if row is not None and keys <= set(row):
        return True
    try:
        return not path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False


#: Settings recorded in FILE.run.json since a later version: a run.json without one resumes as before.
NEWER_SETTINGS = ("model_weights",)


def _settings(args: argparse.Namespace, model: str | None) -> dict[str, Any]:
    """What makes two runs' rows comparable (recorded in FILE.run.json; a resume needs the same). ``model_weights``
    is :func:`ctiqa.model_settings.weights_fingerprint` of the local model/adapter folders (None for Hub ids and a
    server, where nothing local is loaded)."""
    return {"model": model, "adapter": args.adapter, "format": args.format, "encoding": args.encoding,
            "unit_is_hu": args.unit_is_hu, "score_only": args.score_only, "precision": args.precision,
            "max_new_tokens": None if args.score_only else args.max_new_tokens, "file_names": args.file_names,
            "model_weights": None if args.server else weights_fingerprint(model, args.adapter),
            **({"server": redact_url(args.server)} if args.server else {})}


def cli_main(args: argparse.Namespace) -> int:
    """Run ``ctiqa predict``. Exit 0 when at least one slice has a score (now or from the run resumed), 1 when none
    has (nothing readable, or every scoring call failed: a one-line summary says which)."""
    from ctiqa.inference import check_score_only, load_model, trained_settings_of

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise CTIQAError(f"--batch-size and --max-new-tokens must be at least 1 (got {args.batch_size}, "
                         f"{args.max_new_tokens})")
    model, adapter = args.model, args.adapter
    if args.server and (adapter or not model):
        raise CTIQAError("--server needs --model (the served model name) and no --adapter (merge it first: ctiqa "
                         "export)")
    if model is None and adapter is None:
        if not DEMO_MODEL.exists():
            raise CTIQAError(f"no --model given and no demo model at {DEMO_MODEL.absolute()}: run `make demo` in a "
                             "ctiqa checkout and call ctiqa predict from there, or pass --model/--adapter")
        model = str(DEMO_MODEL)
    trained = None if args.server else trained_settings_of(adapter or model)  # render and answer as trained
    args.encoding = choose_encoding(args.encoding, trained)
    args.format = args.format or (trained and trained.target_format) or DEFAULT_TARGET_FORMAT
    if args.score_only:
        check_score_only(args.format)
    if args.html is not None:
        from ctiqa.html_report import check_html_path, write_predict_report

        check_html_path(args.html)
    check_ids(args.inputs, args.ids)
    if args.out is not None:
        check_companions(args.out)
    sink = RowSink(args.out, _settings(args, model), args.file_names)  # a bad --out fails here, before any work
    loaded: dict[str, Backend] = {}

    def backend(images: list[Any]) -> list[dict[str, Any]]:
        """The model is loaded for the first batch: nothing readable or all done already -> never loaded."""
        if "model" not in loaded and args.server:  # an OpenAI-compatible inference server (ctiqa.serving)
            from ctiqa.serving import ServerScorer

            loaded["model"] = ServerScorer(args.server, model, fmt=args.format, score_only=args.score_only,
                                           max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                                           cache=_companions(args.out)[2] if args.out is not None else None)
        if "model" not in loaded:
            lm = load_model(model, adapter, precision=args.precision)
            loaded["model"] = model_backend(lm, fmt=args.format, score_only=args.score_only,
                                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        return loaded["model"](images)

    shown: list[dict[str, Any]] = []
    running: dict[str, SeriesSummary] = {}
    try:
        series = gather_series(args.inputs, args.ids, file_names=args.file_names,
                               known={sid for sid, _ in sink.done})
        own = {os.path.realpath(f) for f in (args.html, *((args.out, *_companions(args.out),
                                                          Path(str(args.out) + ".lock")) if args.out else ())) if f}
        for s in series:  # this command's own outputs inside an input folder are not unreadable slices
            s.errors = [(n, m) for n, m in s.errors if os.path.realpath(n) not in own]
        stream = args.out is None and sum(len(s.refs) for s in series) > TABLE_MAX

        def on_row(row: dict[str, Any]) -> None:
            running.setdefault(str(row["series"]), SeriesSummary(str(row["series"]))).add(row)
            if stream:  # no file to look at later and too many for a table: print each row as it comes
                print(json.dumps(row), flush=True)
            elif len(shown) <= TABLE_MAX or args.html is not None:
                shown.append(row)

        batch = max(args.batch_size, 4 * args.concurrency) if args.server else args.batch_size
        counts = score_series(series, backend, sink, encoding=args.encoding, batch_size=batch,
                              unit_is_hu=args.unit_is_hu, file_names=args.file_names, on_row=on_row)
    except KeyboardInterrupt:
        if args.out is not None:
            print(f"the slices scored so far are kept in {args.out}; the same command resumes from there",
                  file=sys.stderr)
        raise
    finally:
        sink.close()
    order = [s.id for s in series]
    if args.out is not None:  # the file holds this run's rows, the resumed ones, and any earlier run's series
        in_file = list(dict.fromkeys(str(r["series"]) for r in sink.read()))
        earlier = [i for i in in_file if i not in order]
        if earlier:
            print(f"note: {args.out} also holds {len(earlier)} series of an earlier run ({', '.join(earlier[:3])}"
                  + (" ..." if len(earlier) > 3 else "") + "); the series summary covers them too", file=sys.stderr)
        order = in_file + [i for i in order if i not in in_file]
        summaries = summaries_from_rows(sink.read(), order)
        table = list(sink.read()) if counts["resumed"] + len(shown) <= TABLE_MAX else None
    else:
        summaries = [running[s].result() for s in order if s in running]
        table = None if stream or len(shown) > TABLE_MAX else shown
    _print_tables(table, summaries, args.score_only)
    if args.out is not None:
        series_file = _companions(args.out)[1]
        write_rows(series_file, summaries)
        print(f"wrote {args.out} and {series_file.name}")
    if args.html is not None:
        rows = list(sink.read()) if args.out is not None else shown
        write_predict_report(args.html, [r for r in rows if not r.get("skipped")], summaries, series,
                             encoding=args.encoding, unit_is_hu=args.unit_is_hu,
                             model=" + ".join(filter(None, (model, adapter))))
        print(f"wrote {args.html}")
    n_scored = counts["scored"] - counts["failed"] + counts["resumed"]
    if counts["resumed"]:
        print(f"resumed: {counts['resumed']} slice(s) already in {args.out}", file=sys.stderr)
    if counts["skipped"]:
        print(f"{counts['skipped']} input(s) or slice(s) skipped (see above"
              + ("" if args.file_names else "; --file-names names the files") + ")", file=sys.stderr)
    if counts["failed"]:
        again = f"; a re-run with --out {args.out} scores them again" if args.out is not None else ""
        print(("error: no slice got a score: " if not n_scored else "warning: ")
              + f"{counts['failed']} slice(s) failed to score (first: {counts['first_error']}){again}",
              file=sys.stderr)
    elif not n_scored:
        print("nothing to score: no input could be read", file=sys.stderr)
    return 0 if n_scored else 1
