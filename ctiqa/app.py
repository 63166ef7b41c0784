"""``ctiqa app``: a Gradio app to look at CT image quality scores — the same one a Hugging Face Space can host.

Upload one or more DICOM files (one series, or several told apart by Series Instance UID), a zipped series folder,
TIFF or PNG/JPEG files; the app scores every slice with the model (the same functions as ``ctiqa predict``:
:func:`ctiqa.predict.gather_series`, :func:`ctiqa.predict.predict`, which render with
:func:`ctiqa.imaging.render`) and shows, per series, the score along the slices and the worst slices, and per slice
the image exactly as the model saw it, the probability score ± its spread, the parsed score, the rationale, the
measured findings and the faithfulness flags — the content of :func:`ctiqa.html_report.predict_report`. The rows
can be downloaded as CSV or JSONL (links holding the data: no file is kept on the server for them).

Privacy: nothing identifying is shown or stored. Series are named ``upload 1``, ``upload 2``... (``DICOM`` for the
loose DICOM files) and slices by index unless "show file names" is ticked; no DICOM metadata is read into the page
or the rows. Uploads live in a private temporary folder (``GRADIO_TEMP_DIR``) that is removed when the app stops;
a session's uploads are deleted as soon as its browser tab closes (``Blocks.unload``), and Gradio's cache sweep
deletes any file older than an hour (``delete_cache``). Zips are extracted to a temporary folder removed right after
reading. Gradio analytics are switched off.

Offline by default: without ``--model``/``--adapter`` the model ``make demo`` trains (``runs/demo/model`` in the
current folder) is used. ``--server URL --model NAME`` scores through an OpenAI-compatible inference server instead
(:class:`ctiqa.serving.ServerScorer`, the backend of ``ctiqa predict --server``).

Programmatic use (e.g. a Space's ``app.py``)::

    from ctiqa.app import Scorer, build_app
    build_app(Scorer.load("runs/demo/model")).launch()

The scoring endpoint is also an API (``api_name="score"``), usable with ``gradio_client``::

    from gradio_client import Client, handle_file
    html, rows = Client("http://127.0.0.1:7860/").predict(
        [handle_file("slice.dcm")], False, False, api_name="/score")
"""

# No `from __future__ import annotations` here: Gradio reads the annotations of the event functions (gr.Request,
# gr.Progress) as objects, and gradio is imported lazily inside build_app.
import argparse
import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.imaging import DEFAULT_ENCODING, ENCODINGS
from ctiqa.model_settings import PRECISIONS
from ctiqa.prompts import DEFAULT_TARGET_FORMAT, TARGET_FORMATS

#: Default port (Gradio's).
DEFAULT_PORT = 7860
#: Files whose suffix says "one image each"; every other upload that is not a zip is read as DICOM.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: Gradio cache sweep: every 10 min, delete files older than 1 h (a closed tab deletes its own files at once).
DELETE_CACHE = (600, 3600)


@dataclass
class Scorer:
    """What scores the slices: an in-process model (:meth:`load`) or an OpenAI-compatible server (:meth:`server`),
    with the settings it was trained with (as for ``ctiqa predict``).

    Attributes:
        backend: ``score_only -> ctiqa.predict.Backend`` (images -> one prediction dict per image).
        name: the model as shown on the page.
    """

    backend: Callable[[bool], Any]
    name: str
    encoding: str = DEFAULT_ENCODING
    unit_is_hu: bool = False
    batch_size: int = 4

    @classmethod
    def load(cls, model: str | None = None, adapter: str | None = None, *, precision: str = "auto",
             fmt: str = DEFAULT_TARGET_FORMAT, max_new_tokens: int = 512, batch_size: int = 4,
             **settings: Any) -> "Scorer":
        """Load ``model``/``adapter`` with :func:`ctiqa.inference.load_model` (default: :func:`demo_model`) and
        score with :func:`ctiqa.predict.model_backend`."""
        from ctiqa.inference import load_model
        from ctiqa.predict import model_backend

        if model is None and adapter is None:
            model = str(demo_model())
        lm = load_model(model, adapter, precision=precision)
        backends = {so: model_backend(lm, fmt=fmt, score_only=so, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size) for so in (False, True)}
        name = " + ".join(str(x) for x in (lm.model_id, lm.adapter) if x)
        return cls(backends.__getitem__, name, batch_size=batch_size, **settings)

    @classmethod
    def server(cls, url: str, model: str, *, fmt: str = DEFAULT_TARGET_FORMAT, max_new_tokens: int = 512,
               concurrency: int = 8, **settings: Any) -> "Scorer":
        """Score through an OpenAI-compatible inference server serving ``model`` at ``url``, with
        :class:`ctiqa.serving.ServerScorer` (the backend of ``ctiqa predict --server``; no answer log here:
        the app keeps nothing). A backend is made when first used.
        """
        from ctiqa.serving import ServerScorer

        made: dict[bool, Any] = {}

        def backend(score_only: bool) -> Any:
            if score_only not in made:
                made[score_only] = ServerScorer(url, model, fmt=fmt, score_only=score_only,
                                                max_new_tokens=max_new_tokens, concurrency=concurrency)
            return made[score_only]

        from ctiqa.clients import redact_url

        return cls(backend, f"{model} at {redact_url(url)}", batch_size=max(4, 4 * concurrency), **settings)


def demo_model() -> Path:
    """The model ``make demo`` trained: :data:`ctiqa.demo.DEMO_MODEL` (``runs/demo/model`` under the current
    folder).

    Raises:
        CTIQAError: it does not exist.
    """
    from ctiqa.demo import DEMO_MODEL

    if not DEMO_MODEL.is_dir():
        raise CTIQAError(f"no --model given and no demo model at {DEMO_MODEL.absolute()}: run `make demo` in a "
                         "checkout first, start the app there, or pass --model/--adapter")
    return DEMO_MODEL


# ---------------------------------------------------------------------------------------------------- uploads
def _extract_zip(path: Path, dest: Path) -> None:
    """Extract a zip into ``dest``, refusing members that would land outside it (absolute paths, ``..``)."""
    try:
        with zipfile.ZipFile(path) as z:
            for m in z.infolist():
                target = (dest / m.filename).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise CTIQAError(f"{path.name}: zip member {m.filename!r} points outside the archive")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise CTIQAError(f"{path.name}: not a readable zip file ({e})") from e


def gather_uploads(paths: list[str | Path], workdir: Path, show_names: bool = False) -> tuple[list[Any], dict]:
    """Turn uploaded files into :class:`ctiqa.predict.Series`.

    Loose DICOM files are read together as one folder (so the slices of a series are ordered along the slice
    normal, and several series are told apart by Series Instance UID); each zip is one folder (a zipped series
    folder); each TIFF/PNG/JPEG file is its own series (a multi-page TIFF gives one slice per page).

    Args:
        paths: the uploaded files. workdir: an empty private folder, kept while the series are read (loose DICOM
            files are linked into ``workdir/dicom`` as ``upload_N.ext``, zips extracted into ``workdir/zipN``).
        show_names: name series and links after the uploaded files instead of ``upload N``.
    Returns:
        (series list, labels: upload path, working path or link name -> ``upload N`` (the file name with
        ``show_names``), to name uploads in messages without their file names).
    """
    from ctiqa.predict import gather_series

    dicom_dir = workdir / "dicom"
    inputs: list[str] = []
    ids: list[str] = []
    labels: dict[str, str] = {}
    n = 0
    for raw in paths:
        p = Path(raw)
        n += 1
        label = p.name if show_names else f"upload {n}"
        labels[str(p)] = label
        if zipfile.is_zipfile(p):
            dest = workdir / f"zip{n}"
            dest.mkdir()
            _extract_zip(p, dest)
            inputs.append(str(dest))
            ids.append(label)
            labels[str(dest)] = label
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            inputs.append(str(p))
            ids.append(label)
        else:
            dicom_dir.mkdir(exist_ok=True)
            name = p.name if show_names else f"upload_{n}{p.suffix}"
            if (dicom_dir / name).exists():  # two uploads of the same name
                name = f"{n}_{name}"
            (dicom_dir / name).symlink_to(p.resolve())
            labels[str(dicom_dir / name)] = labels[name] = label
    if dicom_dir.exists():
        inputs.insert(0, str(dicom_dir))
        ids.insert(0, "DICOM")
        labels[str(dicom_dir)] = "DICOM"
    return gather_series(inputs, ids), labels


def _private(text: str, labels: dict[str, str]) -> str:
    """``text`` with every upload/working path replaced by its label (longest first)."""
    for path in sorted(labels, key=len, reverse=True):
        text = text.replace(path, labels[path])
    return text


# ---------------------------------------------------------------------------------------------------- scoring
def download_links(rows: list[dict[str, Any]]) -> str:
    """HTML links that download ``rows`` as CSV and JSONL (written by :func:`ctiqa.predict.write_rows`), held in
    the page as data URIs: no file is kept on the server for them."""
    import base64

    from ctiqa.predict import write_rows

    links = []
    with tempfile.TemporaryDirectory(prefix="ctiqa-rows-") as d:
        for name, mime in (("ctiqa-rows.csv", "text/csv"), ("ctiqa-rows.jsonl", "application/x-ndjson")):
            write_rows(Path(d) / name, rows)
            data = base64.b64encode((Path(d) / name).read_bytes()).decode("ascii")
            links.append(f'<a download="{name}" href="data:{mime};base64,{data}">{name}</a>')
    return '<p class="downloads">download the rows: ' + " · ".join(links) + "</p>"


def score_uploads(scorer: Scorer, paths: list[str | Path], *, show_names: bool = False,
                  score_only: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """Score uploaded files; the app's one scoring function (:func:`ctiqa.predict.score_series` with the
    scorer's backend, nothing written to disk but the zips extracted into a temporary folder removed before
    returning).

    Returns:
        (HTML fragment: download links + the report body of :func:`ctiqa.html_report.predict_body`, slice rows
        as ``ctiqa predict`` writes them plus ``findings``/``claims`` where available; skipped inputs are listed
        on the page, not in the rows).
    Raises:
        CTIQAError: nothing uploaded, or nothing readable (the message says why each upload was skipped).
    """
    from ctiqa.html_report import embeddable, predict_body, prepare_series
    from ctiqa.predict import RowSink, score_series, summaries_from_rows

    if not paths:
        raise CTIQAError("upload DICOM files, a zipped DICOM series folder, TIFF or PNG files first")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def on_row(row: dict[str, Any]) -> None:
        name = row.pop("file", None)  # the working name: a label for loose files, the member name in a zip
        if row.get("skipped"):
            where = labels.get(name or "") or (row["series"] + ("" if row.get("slice") is None
                                                                else f" slice {row['slice']}"))
            skipped.append(f"{where}: {_private(row['skipped'], labels)}")
            return
        if show_names and name is not None:
            row["file"] = Path(name).name if Path(name).is_absolute() else name
        rows.append(row)

    with tempfile.TemporaryDirectory(prefix="ctiqa-work-") as work:
        series, labels = gather_uploads(paths, Path(work), show_names)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # skipped files: on the page only
            score_series(series, scorer.backend(score_only), RowSink(None, {}, show_names),
                         encoding=scorer.encoding, batch_size=scorer.batch_size, unit_is_hu=scorer.unit_is_hu,
                         file_names=True, on_row=on_row)
        if not rows:
            raise CTIQAError("nothing could be read: " + "; ".join(skipped))
        images = prepare_series(rows, series, scorer.encoding, scorer.unit_is_hu)  # reads the pixels again
    summaries = summaries_from_rows(rows, [s.id for s in series])
    body = predict_body(rows, summaries, images, model=scorer.name, skipped=skipped)
    return embeddable(download_links(rows) + body), rows


# ---------------------------------------------------------------------------------------------------- the app
def _delete_uploads(paths: set[str]) -> None:
    """Delete uploaded files and the per-upload folders Gradio made for them (when empty)."""
    for f in paths:
        p = Path(f)
        p.unlink(missing_ok=True)
        try:
            p.parent.rmdir()
        except OSError:
            pass


def build_app(scorer: Scorer, *, title: str = "ctiqa: CT image quality") -> Any:
    """The Gradio ``Blocks`` of the app (not launched). Needs the ``app`` extra (``pip install 'ctiqa[app]'``).

    A session's uploads are recorded as they arrive and deleted when its tab closes (``Blocks.unload``).

    Raises:
        CTIQAError: Gradio is not installed.
    """
    try:
        import gradio as gr
    except ImportError as e:
        raise CTIQAError("the app needs Gradio: pip install 'ctiqa[app]'") from e

    uploads: dict[str, set[str]] = {}  # session -> uploaded files

    def remember(files: list[str] | None, request: gr.Request) -> None:
        uploads.setdefault(request.session_hash, set()).update(str(f) for f in files or [])

    def forget(request: gr.Request) -> None:
        _delete_uploads(uploads.pop(request.session_hash, set()))

    def score(files: list[str] | None, show_names: bool, score_only: bool, request: gr.Request,
              progress: Any = gr.Progress(track_tqdm=True)) -> tuple[str, list[dict[str, Any]]]:  # noqa: B008
        if request is not None and request.session_hash:
            remember(files, request)
        try:
            return score_uploads(scorer, [str(f) for f in files or []], show_names=show_names,
                                 score_only=score_only)
        except CTIQAError as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title=title, delete_cache=DELETE_CACHE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nScores on the LDCTIQA 0-4 scale (0 bad, 1 poor, 2 fair, 3 good, 4 excellent) with "
                    f"a written rationale, by `{scorer.name}`. Upload DICOM files (one series or several), a "
                    "zipped series folder, TIFF or PNG. Nothing leaves this machine; no DICOM metadata is shown; "
                    "uploads are deleted when you close this tab.")
        with gr.Row():
            files = gr.File(label="CT files", file_count="multiple", type="filepath", elem_id="ctiqa-files")
            with gr.Column():
                show_names = gr.Checkbox(label="show file names", value=False)
                score_only = gr.Checkbox(label="score only (no rationale; much faster)", value=False)
                button = gr.Button("Score", variant="primary", elem_id="ctiqa-score")
        report = gr.HTML(elem_id="ctiqa-report")
        with gr.Accordion("rows (JSON)", open=False):
            rows = gr.JSON()
        files.upload(remember, [files], None, api_visibility="private")
        button.click(score, [files, show_names, score_only], [report, rows], api_name="score")
        demo.unload(forget)
    return demo


# ---------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ctiqa app``."""
    parser.add_argument("--model", help="base model Hub id or folder (default: runs/demo/model, offline)")
    parser.add_argument("--adapter", help="PEFT adapter Hub id or folder")
    parser.add_argument("--server", metavar="URL", help="score through an OpenAI-compatible inference server (vLLM, "
                        "transformers serve) at URL; --model is then the served model name")
    parser.add_argument("--concurrency", type=int, default=8, help="with --server: requests in flight (default 8)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                        "the network)")
    parser.add_argument("--format", default=DEFAULT_TARGET_FORMAT, choices=TARGET_FORMATS,
                        help="the target format the model was trained with")
    parser.add_argument("--encoding", default=DEFAULT_ENCODING, choices=ENCODINGS,
                        help="RGB encoding the model was trained with")
    parser.add_argument("--unit-is-hu", action="store_true",
                        help="treat [0,1] LDCTIQA-style images as W350/L40-windowed HU (for medgemma-3window)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)


def check_port(host: str, port: int) -> None:
    """Refuse a port that cannot be listened on (in use, out of 1..65535, not permitted) before the model loads.

    Probes with a bind as the web server will (SO_REUSEADDR set, so a port left in TIME_WAIT is not refused).

    Raises:
        CTIQAError: one line naming ``host:port`` and why.
    """
    import socket

    if not 1 <= port <= 65535:
        raise CTIQAError(f"--port {port}: must be 1..65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise CTIQAError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}; in use by another "
                         "program?); choose another --port") from e


def cli_main(args: argparse.Namespace) -> int:
    """Run ``ctiqa app`` until interrupted. Returns 0.

    Raises:
        CTIQAError: bad options, or ``--port`` cannot be listened on (checked before the model loads).
    """
    if args.server and (args.adapter or not args.model):
        raise CTIQAError("--server needs --model (the served model name) and no --adapter (merge it first: ctiqa "
                         "export)")
    for option in ("batch_size", "max_new_tokens", "concurrency"):
        if getattr(args, option, 1) < 1:
            raise CTIQAError(f"--{option.replace('_', '-')} must be at least 1 (got {getattr(args, option)})")
    check_port(args.host, args.port)
    # Gradio reads these at import: a private upload folder removed at exit, and no analytics calls.
    tmp = tempfile.mkdtemp(prefix="ctiqa-app-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` too ends through atexit
    os.environ["GRADIO_TEMP_DIR"] = tmp
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    settings = {"fmt": args.format, "encoding": args.encoding, "unit_is_hu": args.unit_is_hu,
                "max_new_tokens": args.max_new_tokens}
    if args.server:
        scorer = Scorer.server(args.server, args.model, concurrency=args.concurrency, **settings)
    else:
        scorer = Scorer.load(args.model, args.adapter, precision=args.precision, batch_size=args.batch_size,
                             **settings)
    demo = build_app(scorer)
    print(f"ctiqa app: model {scorer.name}; uploads kept in a private folder removed at exit", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=False, show_error=True, quiet=False)
    return 0
