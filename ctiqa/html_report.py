"""Self-contained HTML reports of scores, rationales and findings (``ctiqa predict --html``, ``ctiqa evaluate --html``).

One HTML file per report, for sharing and archiving without a server: every image is embedded as a PNG data URI
(the slice exactly as :func:`ctiqa.imaging.render` gave it to the model, and the evaluation plots of
:mod:`ctiqa.plots`); no external script, style sheet or font is referenced, so the file opens offline. The
evaluation table sorts by any column with a few lines of inline JavaScript (click a header); the rest is plain HTML.

Reports are built from the rows the commands already write, so they can be rendered again afterwards:

* :func:`predict_report` — slice rows and series summaries of ``ctiqa predict`` (its ``--out`` JSONL files) plus
  the rendered images by ``(series, slice)``;
* :func:`evaluation_report` — an evaluation folder (``results.json``, ``predictions.jsonl``, ``scatter.png``,
  ``bland_altman.png``) plus the images by sample id (re-read from the dataset named in ``results.json`` when not
  given); ``ctiqa html RUN_DIR`` renders it afterwards.

Per slice the reports show what the model said (probability score ± its spread, parsed score, rationale), the
measured findings of :mod:`ctiqa.findings` when the rows or the caller supply them, and faithfulness flags: where
the rationale's claims (:func:`ctiqa.explanations.extract_claims`) disagree with the measurements, and, on simulated
data, the truth-based rubric of :func:`ctiqa.explanations.check_rationale` (the ``explanation`` field that
``ctiqa evaluate`` writes).

Privacy: a report names series by the id ``ctiqa predict`` gave them and slices by index; it holds no DICOM
metadata. A ``file`` column appears only when the rows carry one (``--file-names``). All text is HTML-escaped.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.paths import atomic_write, check_output_path

#: Largest side (px) of an embedded slice image; larger renders are downscaled for the page only (the model's
#: input is what :func:`ctiqa.imaging.render` gives, before the processor's own resize).
MAX_IMAGE_SIDE = 512

_PAGE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:1.5em;color:#1d1d1f;
max-width:1400px}h1{font-size:1.5em;margin-bottom:.2em}
"""
# Scoped under .ctiqa, so the same fragment can sit inside another page (the Gradio app) without restyling it.
_CSS = """
.ctiqa h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}.ctiqa h3{font-size:1.05em}
.ctiqa .meta{color:#555;font-size:.9em}.ctiqa .note{color:#555;font-size:.85em;margin:.4em 0}
.ctiqa table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
.ctiqa th,.ctiqa td{border:1px solid #ddd;padding:4px 7px;vertical-align:top;text-align:left}
.ctiqa th{background:#f4f4f6}.ctiqa table.sortable th{cursor:pointer;user-select:none}
.ctiqa.js table.sortable th:after{content:" \\2195";color:#aaa}.ctiqa td.num{text-align:right;white-space:nowrap}
.ctiqa td.text{max-width:38em}.ctiqa img.slice{width:160px;height:auto;image-rendering:pixelated;cursor:zoom-in;
background:#000}.ctiqa img.slice.big{width:auto;max-width:512px;cursor:zoom-out}
.ctiqa img.plot{max-width:100%;height:auto}.ctiqa .plots{display:flex;flex-wrap:wrap;gap:8px}
.ctiqa .plots img.plot{max-width:min(49%,620px)}.ctiqa .score{font-size:1.15em;font-weight:600}.ctiqa .spread{color:#666}
.ctiqa .flag{display:inline-block;border-radius:3px;padding:0 5px;margin:1px 0;font-size:.85em}
.ctiqa .flag.bad{background:#fde2e1;color:#8a1c17}.ctiqa .flag.warn{background:#fff3cd;color:#6b4e00}
.ctiqa .flag.ok{background:#e3f4e5;color:#1d5e27}.ctiqa .flag.info{background:#e8eef9;color:#243f73}
.ctiqa .worst{display:flex;gap:12px;flex-wrap:wrap}.ctiqa .worst figure{margin:0;text-align:center;font-size:.85em}
"""

# Sort arrows show once the script runs. Click a header to sort by it (numbers by data-v, text otherwise); click again to reverse. Clicking an image
# toggles its full size.
_JS = """
document.querySelectorAll('.ctiqa').forEach(function(e){e.classList.add('js');});
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var tb=t.tBodies[0],rows=Array.from(tb.rows),asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
  rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;
   if(x!==undefined&&y!==undefined){x=x===''?NaN:+x;y=y===''?NaN:+y;
    if(isNaN(x))return 1;if(isNaN(y))return -1;return asc?x-y:y-x;}
   x=a.cells[i].textContent;y=b.cells[i].textContent;return asc?x.localeCompare(y):y.localeCompare(x);});
  rows.forEach(function(r){tb.appendChild(r);});});});});
document.querySelectorAll('img.slice').forEach(function(im){im.addEventListener('click',function(){
 im.classList.toggle('big');});});
"""


# ---------------------------------------------------------------------------------------------------- pieces
def esc(x: Any) -> str:
    """HTML-escaped text of ``x`` (quotes too, so it is safe in attributes); ``—`` for None."""
    return "—" if x is None else html.escape(str(x), quote=True)


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_data_uri(image: Any, max_side: int = MAX_IMAGE_SIDE) -> str:
    """A PIL image as a PNG data URI, downscaled (Lanczos) so its larger side is at most ``max_side`` px."""
    from PIL import Image

    im = image
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return png_data_uri(buf.getvalue())


def figure_data_uri(fig: Any, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return png_data_uri(buf.getvalue())


def _img(image: Any, alt: str) -> str:
    if image is None:
        return '<span class="note">no image</span>'
    return f'<img class="slice" alt="{esc(alt)}" src="{image_data_uri(image)}">'


def _num(x: Any, digits: int = 2) -> str:
    return "—" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.{digits}f}"


def _v(x: Any) -> str:
    """data-v attribute value for sorting ('' for missing)."""
    return f"{x:.6g}" if isinstance(x, (int, float)) and math.isfinite(x) else ""


def _flag(kind: str, text: str) -> str:
    return f'<span class="flag {kind}">{esc(text)}</span>'


def score_html(row: Mapping[str, Any]) -> str:
    """The score cell: probability score ± its std (0-4) and the parsed score of the generated text."""
    parts = []
    if row.get("prob_score") is not None:
        parts.append(f'<span class="score">{_num(row["prob_score"])}</span> '
                     f'<span class="spread">± {_num(row.get("prob_std"))}</span> <span class="note">(probability)'
                     "</span>")
    if row.get("parse_rule") is not None or row.get("parsed_score") is not None:
        parts.append(f'<span class="score">{_num(row.get("parsed_score"))}</span> <span class="note">(parsed'
                     + ("" if row.get("parsed_score") is not None else ": no score found") + ")</span>")
    return "<br>".join(parts) or "—"


def rationale_text(row: Mapping[str, Any]) -> str | None:
    """The generated answer of a row (``rationale`` in predict rows, ``text`` in evaluation rows)."""
    return row.get("rationale") if row.get("rationale") is not None else row.get("text")


# ---------------------------------------------------------------------------------------------------- findings
def measure(image: Any) -> dict[str, Any] | None:
    """Measured findings of one slice (:func:`ctiqa.findings.measure_findings`) as a row without its ``id`` (a file
    stem, which may be a UID): ``noise_hu``, ``noise_severity``, ``streak_index``, ``streaks``,
    ``soft_tissue_fraction``.

    Args:
        image: a :class:`ctiqa.imaging.CTImage`, or a rendered RGB PIL image (its green channel is the soft-tissue
            window W350/L40 in both encodings of :data:`ctiqa.imaging.ENCODINGS`, read as an 8-bit display image).
    Returns:
        the row, or None when the image is too small to measure.
    """
    from ctiqa.findings import measure_findings
    from ctiqa.imaging import CTImage

    if not isinstance(image, CTImage):
        import numpy as np

        image = CTImage(np.asarray(image.convert("RGB"))[..., 1], kind="display", source="image")
    try:
        row = measure_findings(image, id="").to_row()
    except CTIQAError:
        return None
    row.pop("id", None)
    return row


def claims_of(text: str | None) -> dict[str, Any] | None:
    """What a rationale asserts (``noise``, ``streaks``, ``other_artifacts``;
    :func:`ctiqa.explanations.extract_claims`); None without text."""
    from ctiqa.explanations import extract_claims

    return extract_claims(text).to_dict() if text else None


def annotate(row: dict[str, Any], image: Any = None) -> dict[str, Any]:
    """Add ``findings`` (:func:`measure`, when ``image`` is given) and ``claims`` (:func:`claims_of` the row's
    rationale) to a row that lacks them, in place. Returns the row."""
    if "findings" not in row and image is not None:
        f = measure(image)
        if f is not None:
            row["findings"] = f
    if "claims" not in row:
        c = claims_of(rationale_text(row))
        if c is not None:
            row["claims"] = c
    return row


def faithfulness_flags(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flags ``(kind, text)`` with kind ``bad`` / ``warn`` / ``ok`` / ``info`` for one row.

    Reads what the row carries: ``findings`` (measured, see :func:`measure`) with ``claims`` (see
    :func:`claims_of`): streaks claimed but none measured, measured streaks denied or not mentioned; the stated
    noise class against the measured one on the shared scale of :mod:`ctiqa.vocabulary` (absent/none < mild <
    moderate < severe: the same class is ok, one class off a warning, two or more bad; noise named without a
    class where none is measured, or moderate/severe noise not mentioned, a warning); other artifacts as
    unverified (nothing measures them). And ``explanation`` (the truth-based rubric on simulated data that
    ``ctiqa evaluate`` adds): applied degradation not named, severity stated vs expected, false streaks.
    """
    from ctiqa.explanations import Claims, compare_claims
    from ctiqa.findings import STREAK_CALL_VALIDATED
    from ctiqa.vocabulary import SEVERITIES

    out: list[tuple[str, str]] = []
    f, c = row.get("findings"), row.get("claims")
    if f and c:
        # the comparison itself lives in ctiqa.explanations (one home); this only grades it for display.
        # An unvalidated streak call (ctiqa.findings.STREAK_CALL_VALIDATED) can only warn, never mark a claim bad.
        check = compare_claims(Claims(noise=c.get("noise"), streaks=c.get("streaks"),
                                      other_artifacts=tuple(c.get("other_artifacts") or ())), f)
        streak_bad = "bad" if STREAK_CALL_VALIDATED else "warn"
        note = "" if STREAK_CALL_VALIDATED else " (unvalidated call)"
        if f.get("streaks") is not None:
            if check["streaks_contradict"]:
                out.append((streak_bad, "streaks claimed, none measured" + note))
            elif f["streaks"] and c.get("streaks") == "absent":
                out.append((streak_bad, "measured streaks denied" + note))
            elif f["streaks"] and c.get("streaks") is None:
                out.append(("warn", "measured streaks not mentioned" + note))
            elif check["streaks_agree"]:
                out.append(("ok", f"streaks {'present' if f['streaks'] else 'absent'}: agrees"))
        said, measured = c.get("noise"), f.get("noise_severity")
        if measured in SEVERITIES:
            if check["noise_bands_off"] is not None:
                out.append((("ok", "warn", "bad")[min(check["noise_bands_off"], 2)],
                            f"noise {said}, measured {measured}"))
            elif said == "present" and measured == "none":
                out.append(("warn", "noise named, measured none"))
            elif said is None and SEVERITIES.index(measured) >= 2:
                out.append(("warn", f"measured {measured} noise not mentioned"))
        for a in check["unverified"]:
            out.append(("info", f"{a.replace('_', ' ')}: unverified"))
    e = row.get("explanation")
    if e:
        for kind in ("noise", "streaks"):
            if e.get(f"{kind}_applied"):
                if not e.get(f"{kind}_named"):
                    out.append(("bad", f"applied {kind} not named (truth)"))
                elif e.get(f"{kind}_stated") != e.get(f"{kind}_expected"):
                    stated, expected = e.get(kind + "_stated"), e.get(kind + "_expected")
                    out.append(("warn", f"{kind} stated {stated}, truth {expected}"))
                else:
                    out.append(("ok", f"{kind} {e.get(kind + '_expected')}: matches truth"))
        if e.get("streaks_named") and not e.get("streaks_applied"):
            out.append(("bad", "streaks named, none applied (truth)"))
    return out


def findings_html(row: Mapping[str, Any]) -> str:
    """The measured-findings cell (noise σ in HU and its class, streak index and call), or a dash."""
    f = row.get("findings")
    if not f:
        return '<span class="note">—</span>'
    parts = []
    if f.get("noise_hu") is not None:
        parts.append(f"noise {_num(f['noise_hu'], 1)} HU" + (f" ({esc(f['noise_severity'])})"
                                                              if f.get("noise_severity") else ""))
    if f.get("streaks") is not None:
        parts.append(f"streaks {'yes' if f['streaks'] else 'no'}"
                     + (f" (index {_num(f.get('streak_index'))})" if f.get("streak_index") is not None else ""))
    return "<br>".join(parts) or "—"


def flags_html(row: Mapping[str, Any]) -> str:
    flags = faithfulness_flags(row)
    return "<br>".join(_flag(k, t) for k, t in flags) if flags else '<span class="note">—</span>'


def _page(title: str, body: str) -> str:
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR_META}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_PAGE_CSS}{_CSS}</style></head><body>\n"
            f"<h1>{esc(title)}</h1><p class=\"meta\">generated by ctiqa {esc(_version())} on {generated}. "
            "Scores on the LDCTIQA 0-4 scale (0 bad, 1 poor, 2 fair, 3 good, 4 excellent). Click a slice to "
            f'enlarge it.</p>\n<div class="ctiqa">{body}</div>\n<script>{_JS}</script>'
            + "\n</body></html>\n")


def embeddable(body: str) -> str:
    """``body`` with the report's style, scoped to a ``<div class="ctiqa">``, to embed in another page."""
    return f'<style>{_CSS}</style><div class="ctiqa">{body}</div>'


def _version() -> str:
    import ctiqa

    return ctiqa.__version__


# ---------------------------------------------------------------------------------------------------- predict
def slice_table_html(rows: list[Mapping[str, Any]], images: Mapping[tuple[str, int], Any] | None = None) -> str:
    """A table with one row per slice: index, (file), rendered image, score ± spread, rationale, measured
    findings and faithfulness flags. ``images`` maps ``(series, slice)`` to the rendered PIL image."""
    has_files = any("file" in r for r in rows)
    head = ["slice", *(["file"] if has_files else []), "image", "score", "rationale", "findings", "flags"]
    out = ['<table class="slices sortable"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for r in rows:
        img = (images or {}).get((r["series"], r["slice"]))
        score = r.get("prob_score") if r.get("prob_score") is not None else r.get("parsed_score")
        cells = [f'<td class="num" data-v="{r["slice"]}">{r["slice"]}</td>',
                 *([f'<td>{esc(r.get("file"))}</td>'] if has_files else []),
                 f"<td>{_img(img, 'slice ' + str(r['slice']))}</td>",
                 f'<td class="num" data-v="{_v(score)}">{score_html(r)}</td>',
                 f'<td class="text">{esc(rationale_text(r))}</td>',
                 f"<td>{findings_html(r)}</td>", f"<td>{flags_html(r)}</td>"]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def series_html(summary: Mapping[str, Any], rows: list[Mapping[str, Any]],
                images: Mapping[tuple[str, int], Any] | None = None, plot: bool = True) -> str:
    """One series: its summary line, the score along the series (a PNG, for more than one slice), the worst
    slices with their images, and the slice table (:func:`slice_table_html`)."""
    from ctiqa.plots import series_plot

    sid = summary["series"]
    parts = [f"<h2>Series: {esc(sid)}</h2>",
             f'<p>{summary["n_slices"]} slice(s) scored, mean score <b>{_num(summary.get("mean"))}</b>, '
             f'lowest <b>{_num(summary.get("min"))}</b>'
             + (f', {summary["n_unscored"]} without a score' if summary.get("n_unscored") else "")
             + (f', {summary["n_skipped"]} file(s) or slice(s) skipped' if summary.get("n_skipped") else "")
             + "</p>"]
    worst = summary.get("worst_slices") or []
    if plot and len(rows) > 1:
        fig = series_plot(list(rows), None, worst=[w["slice"] for w in worst])
        parts.append(f'<img class="plot" alt="score along series {esc(sid)}" src="{figure_data_uri(fig)}">')
    if worst:
        figs = "".join(
            f"<figure>{_img((images or {}).get((sid, w['slice'])), 'slice ' + str(w['slice']))}"
            f"<figcaption>slice {w['slice']}{' ' + esc(w['file']) if 'file' in w else ''}: "
            f"<b>{_num(w['score'])}</b></figcaption></figure>" for w in worst)
        parts.append(f'<h3>worst slices</h3><div class="worst">{figs}</div>')
    parts.append(slice_table_html(rows, images))
    return "\n".join(parts)


def predict_body(rows: list[Mapping[str, Any]], summaries: list[Mapping[str, Any]],
                 images: Mapping[tuple[str, int], Any] | None = None, *, model: str | None = None,
                 skipped: list[str] | None = None) -> str:
    """The content of :func:`predict_report` (HTML, unstyled: wrap it with :func:`embeddable` to place it in
    another page such as the Gradio app)."""
    n = len(rows)
    body = [f'<p class="meta">{len(summaries)} series, {n} slice(s)'
            + (f"; model {esc(model)}" if model else "") + ". No DICOM metadata is shown; series are named as "
            "given to ctiqa, slices by their index along the slice normal.</p>"]
    if skipped:
        body.append(f'<p class="note">skipped {len(skipped)}: ' + "; ".join(esc(s) for s in skipped) + "</p>")
    for s in summaries:
        body.append(series_html(s, [r for r in rows if r["series"] == s["series"]], images))
    return "\n".join(body)


def predict_report(rows: list[Mapping[str, Any]], summaries: list[Mapping[str, Any]],
                   images: Mapping[tuple[str, int], Any] | None = None, *, model: str | None = None,
                   title: str = "ctiqa predict", skipped: list[str] | None = None) -> str:
    """The HTML page of a ``ctiqa predict`` batch.

    Args:
        rows: slice rows (``series``, ``slice``, ``prob_score``, ``prob_std``, ``parsed_score``, ``parse_rule``,
            ``rationale``, optional ``file``, ``findings``, ``claims``).
        summaries: per-series summaries (:func:`ctiqa.predict.summaries_from_rows`), in the order to show.
        images: ``(series, slice)`` -> rendered RGB PIL image (missing ones are shown as "no image").
        model: the model's description for the header. title: page title. skipped: lines naming what could not
            be read.
    Returns:
        the whole HTML document (str).
    """
    return _page(title, predict_body(rows, summaries, images, model=model, skipped=skipped))


#: In the head of every page ctiqa writes: an existing HTML file without it is someone else's and never replaced.
GENERATOR_META = '<meta name="generator" content="ctiqa html_report">'


def is_ctiqa_html(path: Path) -> bool:
    """True when ``path`` is a page ctiqa wrote (:data:`GENERATOR_META`, or the header line of pages written before
    it existed) in its first 64 KiB."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(65536)
    except OSError:
        return False
    return GENERATOR_META in head or '<p class="meta">generated by ctiqa ' in head


def check_html_path(path: str | Path, what: str = "--html") -> Path:
    """``path`` as a Path, checked before any work is done (:func:`ctiqa.paths.check_output_path`).

    Raises:
        CTIQAError: it does not end in .html/.htm, is a folder, or is an existing file ctiqa did not write
            (:func:`is_ctiqa_html`); nothing is changed.
    """
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm"):
        raise CTIQAError(f"{p}: the HTML report must end in .html")
    return check_output_path(p, what=what, ours=is_ctiqa_html,
                             hint="Give a new .html file (an earlier ctiqa report may be replaced)")


def prepare_series(rows: list[dict[str, Any]], series: list[Any], encoding: str = "soft-tissue",
                   unit_is_hu: bool = False) -> dict[tuple[str, int], Any]:
    """Rendered images by ``(series, slice)`` for the slice rows of :func:`ctiqa.predict.score_series`, rendered
    again with :func:`ctiqa.imaging.render` (the model's pixel path, same ``encoding``) from the
    :class:`ctiqa.predict.Series` that were scored; each row also gets its findings and claims (:func:`annotate`).
    A slice that can no longer be read gets no image. A multi-frame file is read once for all its frames."""
    from ctiqa.imaging import read_ct_frames, render

    by_id = {s.id: s for s in series}
    images: dict[tuple[str, int], Any] = {}
    frames: dict[str, list[Any]] = {}  # the frames of the last multi-frame series read

    def read(s: Any, index: int) -> Any:
        if len(s.refs) == 1 and s.refs[0].frame == "all":  # one file, all its frames: read it once
            if s.id not in frames:
                frames.clear()
                frames[s.id] = read_ct_frames(s.refs[0].path)
            return frames[s.id][index] if 0 <= index < len(frames[s.id]) else None
        return s.read_slice(index)

    for r in rows:
        s = by_id.get(r["series"])
        try:
            ct = read(s, r["slice"]) if s is not None and r.get("slice") is not None else None
        except CTIQAError:
            ct = None
        if ct is None:
            continue
        images[(r["series"], r["slice"])] = render(ct, encoding, unit_is_hu=unit_is_hu)
        annotate(r, ct)
    return images


def write_predict_report(path: str | Path, rows: list[dict[str, Any]], summaries: list[Mapping[str, Any]],
                         series: list[Any] | None = None, *, encoding: str = "soft-tissue", unit_is_hu: bool = False,
                         model: str | None = None) -> Path:
    """Write the :func:`predict_report` of a ``ctiqa predict`` batch to ``path`` (UTF-8).

    Args:
        rows, summaries: as returned by :func:`ctiqa.predict.predict` (rows gain ``findings``/``claims``).
        series: the :class:`ctiqa.predict.Series` that were scored, for the images (None: no images).
        encoding, unit_is_hu: as given to ``ctiqa predict``. model: shown in the header.
    Returns:
        the path written.
    Raises:
        CTIQAError: a path not ending in .html.
    """
    p = check_html_path(path)
    images = prepare_series(rows, series, encoding, unit_is_hu) if series is not None else None
    p.parent.mkdir(parents=True, exist_ok=True)
    page = predict_report(rows, summaries, images, model=model)
    with atomic_write(p, encoding="utf-8") as f:
        f.write(page)
    return p


# ---------------------------------------------------------------------------------------------------- evaluate
def _metrics_html(results: Mapping[str, Any]) -> str:
    metrics = results.get("metrics") or {}
    if not metrics:
        return '<p class="note">no metrics</p>'

    def ci(m: Mapping[str, Any], k: str) -> str:
        c = m.get(f"{k}_ci")
        return _num(m.get(k), 3) + (f' <span class="spread">[{_num(c[0])}, {_num(c[1])}]</span>' if c else "")

    rows = "".join(f"<tr><td>{esc(kind)}</td><td class=\"num\">{m.get('n_valid', m.get('n'))}</td>"
                   + "".join(f'<td class="num">{ci(m, k)}</td>' for k in ("srcc", "plcc", "krcc", "mae"))
                   + "</tr>" for kind, m in metrics.items())
    return ("<table><thead><tr><th>score</th><th>n valid</th><th>SRCC</th><th>PLCC</th><th>KRCC</th><th>MAE</th>"
            f"</tr></thead><tbody>{rows}</tbody></table>")


def _checks_html(results: Mapping[str, Any]) -> str:
    from ctiqa.explanations import summary_lines

    return "".join(f'<p class="note">{esc(o)}</p>' for o in summary_lines(dict(results)))

def evaluation_report(results: Mapping[str, Any], records: list[Mapping[str, Any]],
                      images: Mapping[str, Any] | None = None, plots: Mapping[str, bytes] | None = None) -> str:
    """The HTML page of one evaluation: metrics, scatter and Bland-Altman plots, and a per-sample table (image,
    truth, prediction, absolute error, rationale, findings, faithfulness flags) sortable by any column, worst
    error first.

    Args:
        results: ``results.json`` as written by ``ctiqa evaluate``. records: ``predictions.jsonl`` rows (``id``,
            ``score``, ``prob_score``, ``prob_std``, ``parsed_score``, ``text``, ...).
        images: sample id -> rendered RGB PIL image. plots: name (``scatter``, ``bland_altman``) -> PNG bytes.
    Returns:
        the whole HTML document (str).
    """
    primary = results.get("primary_score") or "parsed"
    col = "prob_score" if primary == "probability" else "parsed_score"
    title = f"ctiqa evaluate: {results.get('name', '')}"
    where = results.get("dataset") or "predictions file"
    body = [f'<p class="meta">{esc(where)}{"/" + esc(results["split"]) if results.get("split") else ""}, '
            f"{len(records)} samples; error = |{esc(primary)} score − truth|.</p>", _metrics_html(results),
            _checks_html(results)]
    if plots:
        body.append('<div class="plots">' + "".join(
            f'<img class="plot" alt="{esc(name.replace("_", "-"))} plot" src="{png_data_uri(png)}">'
            for name, png in plots.items()) + "</div>")

    def err(r: Mapping[str, Any]) -> float | None:
        p = r.get(col)
        return abs(p - r["score"]) if isinstance(p, (int, float)) and isinstance(r.get("score"), (int, float)) \
            else None

    order = sorted(records, key=lambda r: -(err(r) if err(r) is not None else math.inf))
    head = ["id", "image", "truth", "prediction", "error", "rationale", "findings", "flags"]
    t = ['<h2>per sample</h2><p class="note">sorted by error, largest first; click a column header to sort.</p>'
         '<table class="samples sortable"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
         + "</tr></thead><tbody>"]
    for r in order:
        e, pred = err(r), r.get(col)
        t.append("<tr>" + "".join([
            f"<td>{esc(r['id'])}</td>", f"<td>{_img((images or {}).get(str(r['id'])), 'sample ' + str(r['id']))}</td>",
            f'<td class="num" data-v="{_v(r.get("score"))}">{_num(r.get("score"))}</td>',
            f'<td class="num" data-v="{_v(pred)}">{score_html(r)}</td>',
            f'<td class="num" data-v="{_v(e)}">{_num(e)}</td>',
            f'<td class="text">{esc(rationale_text(r))}</td>', f"<td>{findings_html(r)}</td>",
            f"<td>{flags_html(r)}</td>"]) + "</tr>")
    t.append("</tbody></table>")
    body.append("\n".join(t))
    return _page(title, "\n".join(body))


def write_evaluation_report(run_dir: str | Path, path: str | Path | None = None,
                            images: Mapping[str, Any] | None = None) -> Path:
    """Render :func:`evaluation_report` of an evaluation folder to ``path`` (default ``RUN_DIR/report.html``).

    Args:
        run_dir: a ``ctiqa evaluate --out`` folder (``results.json``, ``predictions.jsonl``, plots).
        images: sample id -> rendered image; when None and ``results.json`` names a dataset, the split is read
            again (:func:`ctiqa.evaluation.load_samples`); when that fails the page says "no image".
    Returns:
        the path written.
    Raises:
        CTIQAError: ``run_dir`` lacks ``results.json`` or ``predictions.jsonl``; ``path`` is refused by
            :func:`check_html_path` (checked first).
    """
    from ctiqa.evaluation import PLOT_FILES, PREDICTIONS_FILE, RESULTS_FILE, load_samples

    d = Path(run_dir)
    out = check_html_path(path if path is not None else d / "report.html", what="HTML report")
    if not (d / RESULTS_FILE).is_file() or not (d / PREDICTIONS_FILE).is_file():
        raise CTIQAError(f"{d}: not an evaluation folder (needs {RESULTS_FILE} and {PREDICTIONS_FILE} from "
                         "`ctiqa evaluate --out`)")
    from ctiqa.report import load_result_dir

    results, records = load_result_dir(d)  # one reader: a bad or cut file is one line naming it
    if images is None and results.get("dataset"):
        try:
            samples, _ = load_samples(results["dataset"], results.get("split") or "test")
            truth = {str(r["id"]): r.get("score") for r in records}
            changed = next((s for s in samples if s.id in truth and isinstance(truth[s.id], (int, float))
                            and abs(truth[s.id] - s.score) > 1e-6), None)
            if changed is not None:  # the folder now holds another dataset: its images are not the ones scored
                raise CTIQAError(f"dataset {results['dataset']} has changed since this evaluation (id {changed.id}: "
                                 f"score {truth[changed.id]} then, {changed.score} now)")
            images = {s.id: s.image for s in samples}
        except CTIQAError as e:
            print(f"note: images not embedded: {e}")
    plots = {k: (d / f).read_bytes() for k, f in PLOT_FILES.items() if (d / f).is_file()}
    for r in records:
        annotate(r, (images or {}).get(str(r["id"])))
    out.parent.mkdir(parents=True, exist_ok=True)
    page = evaluation_report(results, records, images, plots)
    with atomic_write(out, encoding="utf-8") as f:
        f.write(page)
    return out


# ---------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ctiqa html``."""
    parser.add_argument("run_dir", type=Path, help="a `ctiqa evaluate --out` folder")
    parser.add_argument("--out", type=Path, help="HTML file to write (default RUN_DIR/report.html)")


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa html RUN_DIR``: render an evaluation folder as one self-contained HTML file."""
    out = write_evaluation_report(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0
