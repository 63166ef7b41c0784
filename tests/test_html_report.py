"""Self-contained HTML reports: `ctiqa predict --html`, `ctiqa evaluate --html`, `ctiqa html`, and in a real browser.

The images in the page must be the pixels the model saw (ctiqa.imaging.render), the page must reference nothing
outside itself, every text must be escaped, and the evaluation table must sort by error.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pydicom
import pytest
from browser import browser_page
from PIL import Image
from pydicom.data import get_testdata_file

from ctiqa import CTIQAError
from ctiqa.cli import main as ctiqa_main
from ctiqa.html_report import evaluation_report, faithfulness_flags, predict_report
from ctiqa.imaging import read_ct, render
from ctiqa.testing.sft_data import write_dataset

DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def tiny(trained_tiny_model):
    """A tiny Gemma 3 taught the answer format (tests/trained_tiny.py): real scores and rationales."""
    return trained_tiny_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _series(folder, n=3):
    """n copies of pydicom's CT_small.dcm at slice positions 0, 10, 20 mm, with more noise further along."""
    folder.mkdir()
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    for k in range(n):
        ds = src.copy()
        ds.ImagePositionPatient = [0.0, 0.0, float(10 * k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        px = ds.pixel_array.astype(np.int32) + rng.normal(0, 40 * k, ds.pixel_array.shape).astype(np.int32)
        ds.PixelData = np.clip(px, 0, 4000).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice_{k}.dcm")
    return folder


def _decoded(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(m))).convert("RGB")) for m in DATA_URI.findall(page)]


def _self_contained(page: str) -> None:
    """No reference to anything outside the file: no http(s)/protocol-relative URLs in src/href/url(), no link
    tags, no @import."""
    assert not re.search(r'(src|href)\s*=\s*"(?!data:|#)', page), "external src/href"
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page


def test_predict_html_embeds_the_model_input(tiny, tmp_path):
    folder = _series(tmp_path / "series")
    html_path = tmp_path / "out" / "report.html"
    rows_path = tmp_path / "out" / "rows.jsonl"
    rc = ctiqa_main(["predict", str(folder), "--id", "scan-7", "--model", str(tiny), "--html", str(html_path),
                     "--out", str(rows_path), "--max-new-tokens", "40"])
    assert rc == 0
    page = html_path.read_text(encoding="utf-8")
    _self_contained(page)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    # the slice images are exactly what render() gave the model, in series order (3 in the table + 3 worst)
    shown = _decoded(page)
    rendered = [np.asarray(render(read_ct(folder / f"slice_{k}.dcm"))) for k in range(3)]
    for want in rendered:
        assert sum(np.array_equal(want, got) for got in shown) == 2  # table + worst slices
    # the score along the series is a plot (wider than a slice), and every row's score and text are on the page
    assert any(im.shape[1] > 512 for im in shown)
    assert all(r["rationale"].startswith("Score: ") for r in rows)  # real answers, not empty strings
    for r in rows:
        assert f"{r['prob_score']:.2f}" in page
        assert re.sub(r"\s+", " ", __import__("html").escape(r["rationale"])) in re.sub(r"\s+", " ", page)
    assert "slice_0" not in page and str(folder) not in page  # no file names (nor stems) unless asked
    # measured findings (ctiqa.findings) and the rationale's claims checked against them, per slice
    assert page.count(" HU (") == 3 and ("streaks no" in page or "streaks yes" in page)
    assert "scan-7" in page


def test_predict_html_bad_suffix_fails_before_loading(tmp_path, capsys):
    png = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(png)
    assert ctiqa_main(["predict", str(png), "--model", str(tmp_path / "nope"), "--html", str(tmp_path / "r.txt")]) == 2
    assert "must end in .html" in capsys.readouterr().err


def test_text_is_escaped_and_flags_shown():
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    rows = [{"series": "<b>s</b>", "slice": 0, "prob_score": 1.5, "prob_std": 0.2, "parsed_score": 1.4,
             "parse_rule": "score_line", "rationale": evil,
             "findings": {"noise_hu": 55.0, "noise_severity": "moderate", "streak_index": 0.1, "streaks": False},
             "claims": {"noise": "mild", "streaks": "severe", "other_artifacts": ["ring"]}}]
    summary = {"series": "<b>s</b>", "n_slices": 1, "n_unscored": 0, "n_skipped": 0, "mean": 1.5, "min": 1.5,
               "worst_slices": [{"slice": 0, "score": 1.5}]}
    page = predict_report(rows, [summary], {("<b>s</b>", 0): Image.new("RGB", (8, 8))})
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>s</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x" in page
    assert page.count("<script>") == 1  # only the page's own sorting script
    assert "streaks claimed, none measured" in page and "noise mild, measured moderate" in page
    assert "ring: unverified" in page
    assert "noise 55.0 HU (moderate)" in page


@pytest.mark.parametrize(("findings", "claims", "expected"), [
    ({"streaks": True, "noise_severity": "severe"}, {"streaks": "absent", "noise": "mild"},
     [("bad", "measured streaks denied"), ("bad", "noise mild, measured severe")]),
    ({"streaks": True, "noise_severity": "mild"}, {"streaks": None, "noise": "mild"},
     [("warn", "measured streaks not mentioned"), ("ok", "noise mild, measured mild")]),
    ({"streaks": False, "noise_severity": "moderate"}, {"streaks": "absent", "noise": None},
     [("ok", "streaks absent: agrees"), ("warn", "measured moderate noise not mentioned")]),
])
def test_faithfulness_flags(findings, claims, expected, monkeypatch):
    monkeypatch.setattr("ctiqa.findings.STREAK_CALL_VALIDATED", True)  # grading as if the call were validated
    assert faithfulness_flags({"findings": findings, "claims": claims}) == expected


def test_unvalidated_streak_call_only_warns(monkeypatch):
    monkeypatch.setattr("ctiqa.findings.STREAK_CALL_VALIDATED", False)
    row = {"findings": {"streaks": False, "noise_severity": "mild"}, "claims": {"streaks": "severe", "noise": "mild"}}
    assert faithfulness_flags(row) == [("warn", "streaks claimed, none measured (unvalidated call)"),
                                       ("ok", "noise mild, measured mild")]


def test_truth_rubric_flags():
    row = {"explanation": {"noise_applied": True, "noise_named": True, "noise_stated": "severe",
                           "noise_expected": "moderate", "streaks_applied": False, "streaks_named": True}}
    assert faithfulness_flags(row) == [("warn", "noise stated severe, truth moderate"),
                                       ("bad", "streaks named, none applied (truth)")]


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    """`ctiqa evaluate --html` of the tiny model on a 6-sample test split."""
    root = tmp_path_factory.mktemp("eval")
    data = write_dataset(root / "data", {"train": 2, "test": 6})
    out = root / "run"
    assert ctiqa_main(["evaluate", "--model", str(tiny), "--dataset", str(data), "--out", str(out),
                       "--max-new-tokens", "40", "--bootstrap", "20", "--html"]) == 0
    return data, out


def test_evaluate_html(evaluated):
    data, out = evaluated
    page = (out / "report.html").read_text(encoding="utf-8")
    _self_contained(page)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # table rows: largest error first
    body = page.split('<table class="samples sortable">')[1]
    ids = re.findall(r"<tr><td>(\d{4})</td>", body)
    err = {r["id"]: abs(r["prob_score"] - r["score"]) for r in records}
    assert sorted(ids) == sorted(err) and [err[i] for i in ids] == sorted(err.values(), reverse=True)
    # the plots from ctiqa.plots, byte for byte, and the dataset's images
    for name in ("scatter.png", "bland_altman.png"):
        assert base64.b64encode((out / name).read_bytes()).decode() in page
    import datasets

    ds = datasets.load_dataset(str(data), split="test")
    shown = _decoded(page)
    for row in ds:
        assert any(np.array_equal(np.asarray(row["images"][0].convert("RGB")), s) for s in shown)
    from ctiqa.findings import measure_findings
    from ctiqa.imaging import CTImage

    grey = np.asarray(ds[0]["images"][0].convert("RGB"))[..., 1]
    want = measure_findings(CTImage(grey, kind="display", source="x")).noise_hu
    assert f"noise {want:.1f} HU" in page  # findings of the image as shown


def test_html_command_renders_afterwards(evaluated, tmp_path, capsys):
    _, out = evaluated
    target = tmp_path / "again.html"
    assert ctiqa_main(["html", str(out), "--out", str(target)]) == 0
    a = re.sub(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", target.read_text())
    b = re.sub(r"on \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", (out / "report.html").read_text())
    assert a == b
    assert ctiqa_main(["html", str(tmp_path)]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err


def test_html_does_not_embed_the_images_of_a_dataset_replaced_since(evaluated, tmp_path, capsys):
    """QA round 8: after the dataset folder was rebuilt with other images, `ctiqa html RUN` embedded them beside
    the evaluation's predictions and true scores (exit 0, no note); evaluate itself refused that dataset."""
    import shutil

    data, out = evaluated
    run = shutil.copytree(out, tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    other = write_dataset(tmp_path / "other", {"train": 2, "test": 6}, seed=5)  # same ids, other images/scores
    results["dataset"] = str(other)
    (run / "results.json").write_text(json.dumps(results))
    assert ctiqa_main(["html", str(out), "--out", str(tmp_path / "same.html")]) == 0
    assert 'alt="sample ' in (tmp_path / "same.html").read_text()  # the evaluated dataset: its images are shown
    capsys.readouterr()
    assert ctiqa_main(["html", str(run), "--out", str(tmp_path / "r.html")]) == 0
    note = capsys.readouterr().out
    assert "images not embedded" in note and "has changed since this evaluation" in note, note
    assert 'alt="sample ' not in (tmp_path / "r.html").read_text()


def test_evaluation_report_without_images_or_plots():
    page = evaluation_report({"name": "x", "metrics": {}, "primary_score": "parsed"},
                             [{"id": "1", "score": 2.0, "parsed_score": None, "parse_rule": "none", "text": "?"}])
    assert "no image" in page and "no score found" in page


def test_report_in_a_real_browser(evaluated, tmp_path):
    """Chromium opens the file offline: every image decodes, the table is there and sorts by a click."""
    _, out = evaluated
    with browser_page() as page:
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
                   else route.continue_())  # offline: anything fetched from outside would fail
        page.goto((out / "report.html").as_uri())
        imgs = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.className])")
        assert len([i for i in imgs if i[2] == "slice"]) == 6 and len([i for i in imgs if i[2] == "plot"]) == 2
        assert all(ok and w > 0 for ok, w, _ in imgs), imgs
        table = page.locator("table.samples")
        assert table.locator("tbody tr").count() == 6
        errors = [float(x) for x in table.locator("tbody tr td:nth-child(5)").all_inner_texts()]
        assert errors == sorted(errors, reverse=True)
        table.locator("th", has_text="error").click()  # ascending now
        errors = [float(x) for x in table.locator("tbody tr td:nth-child(5)").all_inner_texts()]
        assert errors == sorted(errors)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_check_html_path():
    from ctiqa.html_report import check_html_path

    with pytest.raises(CTIQAError, match="must end in .html"):
        check_html_path("x.pdf")


def test_prepare_series_multipage_tiff(tmp_path):
    """Each frame of a multi-page TIFF gets its own rendered image (read once), findings and claims."""
    import tifffile

    from ctiqa.html_report import prepare_series
    from ctiqa.imaging import read_ct_frames
    from ctiqa.predict import gather_series

    stack = np.random.default_rng(0).random((4, 48, 48), dtype=np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    series = gather_series([str(tmp_path / "stack.tif")], ["s"])
    rows = [{"series": "s", "slice": i, "rationale": "Mild noise; no streaks."} for i in (3, 0)]
    images = prepare_series(rows, series)
    frames = read_ct_frames(tmp_path / "stack.tif")
    for i in (3, 0):
        assert np.array_equal(np.asarray(images[("s", i)]), np.asarray(render(frames[i])))
    assert rows[0]["claims"] == {"noise": "mild", "streaks": "absent", "other_artifacts": []}
    assert rows[0]["findings"]["noise_severity"] in ("none", "mild", "moderate", "severe")
    assert "id" not in rows[0]["findings"]


def test_html_never_writes_over_a_users_page(evaluated, tmp_path, capsys):
    """QA #79: --html FILE (predict, evaluate) and `ctiqa html --out` replaced an existing HTML file of the user.
    Refused before any work, bytes unchanged; a page ctiqa wrote is replaced."""
    _, out = evaluated
    mine = tmp_path / "index.html"
    mine.write_text("<html><body>my page</body></html>\n")
    before = mine.read_bytes()
    png = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(png)
    for argv in (["html", str(out), "--out", str(mine)],
                 ["predict", str(png), "--model", str(tmp_path / "nope"), "--html", str(mine)],
                 ["evaluate", "--predictions", str(out / "predictions.jsonl"), "--out", str(tmp_path / "e"),
                  "--html", str(mine)]):
        assert ctiqa_main(argv) == 2, argv
        assert "not written by ctiqa" in capsys.readouterr().err
        assert mine.read_bytes() == before
    assert not (tmp_path / "e").exists()  # refused before any work
    ours = tmp_path / "ours.html"
    assert ctiqa_main(["html", str(out), "--out", str(ours)]) == 0
    assert ctiqa_main(["html", str(out), "--out", str(ours)]) == 0
