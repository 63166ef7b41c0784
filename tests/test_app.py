"""`ctiqa app`: the real command on 127.0.0.1, driven by gradio_client and by headless Chromium.

The server is the `ctiqa app` process itself, with a tiny Gemma 3 built offline (ctiqa.tiny) and TMPDIR pointed at a
test folder, so the tests can see where uploads go and that they are deleted when the tab closes and the app stops.
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from browser import browser_page
from PIL import Image
from pydicom.data import get_testdata_file

from ctiqa import CTIQAError
from ctiqa.app import Scorer, gather_uploads, score_uploads
from ctiqa.cli import main as ctiqa_main

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")

CT_SMALL = get_testdata_file("CT_small.dcm")
MAX_NEW_TOKENS = "40"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(trained_tiny_model):
    """A tiny Gemma 3 taught the answer format (tests/trained_tiny.py): real scores and rationales."""
    return trained_tiny_model


@pytest.fixture(scope="module")
def app(tiny, tmp_path_factory):
    """`ctiqa app` on a free port; yields (url, its TMPDIR). On teardown: SIGTERM, and its private folder is gone."""
    tmp = tmp_path_factory.mktemp("app_tmp")
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    log = tmp / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ctiqa.cli", "app", "--model", str(tiny), "--port", str(port),
                                 "--max-new-tokens", MAX_NEW_TOKENS], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"ctiqa app did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, tmp
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("ctiqa app did not stop on SIGTERM within 30 s")
    assert not list(tmp.glob("ctiqa-app-*")), "the app's private upload folder outlived it"


@pytest.fixture(scope="module")
def expected(tiny, tmp_path_factory):
    """What `ctiqa predict` says about CT_small.dcm with the same model and settings."""
    out = tmp_path_factory.mktemp("pred") / "rows.jsonl"
    assert ctiqa_main(["predict", CT_SMALL, "--model", str(tiny), "--out", str(out),
                       "--max-new-tokens", MAX_NEW_TOKENS]) == 0
    return json.loads(out.read_text().splitlines()[0])


def _uploads(tmp: Path) -> list[Path]:
    return [p for p in tmp.glob("ctiqa-app-*/*/*") if p.is_file() and p.suffix == ".dcm"]


def test_score_endpoint_through_gradio_client(app, expected, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = app
    client = Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    page, rows = client.predict([handle_file(CT_SMALL)], False, False, api_name="/score")
    assert len(rows) == 1
    row = rows[0]
    # the app scores exactly as `ctiqa predict` does (same functions, same model, greedy)
    assert row["series"] == "DICOM" and row["slice"] == 0
    assert row["prob_score"] == pytest.approx(expected["prob_score"], abs=1e-5)
    assert row["prob_std"] == pytest.approx(expected["prob_std"], abs=1e-5)
    assert row["rationale"] == expected["rationale"] and row["parsed_score"] == expected["parsed_score"]
    assert expected["rationale"].startswith("Score: ") and expected["parsed_score"] is not None  # a real answer
    assert f"{expected['prob_score']:.2f}" in page and html.escape(expected["rationale"]) in page
    # measured findings of the slice (ctiqa.findings), without the file stem it would use as id
    from ctiqa.findings import measure_findings
    from ctiqa.imaging import read_ct

    want = measure_findings(read_ct(CT_SMALL)).to_row()
    assert "id" not in row["findings"] and row["findings"]["noise_hu"] == want["noise_hu"]
    assert row["findings"]["streaks"] == want["streaks"] and f"noise {want['noise_hu']:.1f} HU" in page
    # nothing identifying: no file name, no upload path, no DICOM metadata
    ds = pydicom.dcmread(CT_SMALL)
    for secret in ("CT_small", str(ds.PatientName), str(ds.PatientID), str(ds.SeriesInstanceUID)):
        assert secret not in page and secret not in json.dumps(rows), secret
    # file names only when asked
    _, rows = client.predict([handle_file(CT_SMALL)], True, True, api_name="/score")
    assert rows[0]["file"] == "CT_small.dcm" and rows[0]["rationale"] is None  # score only: no generation


def test_app_in_a_real_browser(app, expected, tmp_path):
    """Chromium uploads CT_small.dcm, clicks Score, sees the score and the rationale; closing the tab deletes the
    upload; the rows download as CSV."""
    url, tmp = app
    with browser_page() as page:
        page.goto(url)
        page.locator("#ctiqa-files input[type=file]").set_input_files(CT_SMALL)
        page.wait_for_timeout(500)
        page.locator("#ctiqa-score").click()
        page.wait_for_selector("#ctiqa-report table.slices", timeout=120_000)
        report = page.locator("#ctiqa-report")
        text = re.sub(r"\s+", " ", report.inner_text())
        assert f"{expected['prob_score']:.2f} ± {expected['prob_std']:.2f}" in text
        assert re.sub(r"\s+", " ", expected["rationale"]).strip() in text
        widths = report.locator("img.slice").evaluate_all("els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
        with page.expect_download() as dl:
            report.locator("a[download='ctiqa-rows.csv']").click()
        csv_text = Path(dl.value.path()).read_text()
        assert csv_text.startswith("series,slice,") and f"{expected['prob_score']}" in csv_text
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        assert _uploads(tmp), "the upload should exist while the session is open"
    # the browser is closed: the session's upload is deleted (Blocks.unload)
    deadline = time.monotonic() + 30
    while _uploads(tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _uploads(tmp), _uploads(tmp)
    assert (tmp_path / "app.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def scorer(tiny):
    return Scorer.load(str(tiny), max_new_tokens=4)


def _dicom(path: Path, z_mm: float) -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    ds.ImagePositionPatient = [0.0, 0.0, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(path)
    return path


def test_zip_series_png_and_loose_dicoms(scorer, tmp_path):
    up = tmp_path / "uploads"
    up.mkdir()
    series_dir = tmp_path / "Patient^Name_series"
    series_dir.mkdir()
    for k, z in enumerate((20.0, 0.0, 10.0)):
        _dicom(series_dir / f"IMG{k}.dcm", z)
    zpath = up / "series.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in series_dir.iterdir():
            z.write(f, f"Patient^Name_series/{f.name}")
    png = up / "john_doe.png"
    Image.fromarray(np.tile(np.uint8([[90, 110]]), (48, 24))).save(png)
    loose = [_dicom(up / "b.dcm", 5.0), _dicom(up / "a.dcm", 15.0)]
    junk = up / "notes.txt"
    junk.write_text("not an image")
    page, rows = score_uploads(scorer, [str(zpath), str(png), *map(str, loose), str(junk)])
    by_series: dict[str, list[int]] = {}
    for r in rows:
        by_series.setdefault(r["series"], []).append(r["slice"])
    assert by_series == {"DICOM": [0, 1], "upload 1": [0, 1, 2], "upload 2": [0]}
    for secret in ("Patient^Name", "john_doe", "IMG0", "series.zip", "notes.txt", str(up)):
        assert secret not in page and secret not in json.dumps(rows), secret
    assert "upload 5" in page  # the unreadable upload is named by its label, not its file name
    assert not list(up.glob("*/")), "nothing extracted beside the uploads"


def test_nothing_readable_and_zip_slip(scorer, tmp_path):
    bad = tmp_path / "secret_name.dcm"
    bad.write_bytes(b"garbage")
    with pytest.raises(CTIQAError, match="nothing could be read: upload 1") as e:
        score_uploads(scorer, [str(bad)])
    assert "secret_name" not in str(e.value)
    with pytest.raises(CTIQAError, match="upload"):
        score_uploads(scorer, [])
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.dcm", b"x")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CTIQAError, match="outside the archive"):
        gather_uploads([str(evil)], work)
    assert not (tmp_path / "outside.dcm").exists()


def test_server_mode_scores_like_in_process(tiny, tmp_path):
    """`ctiqa app --server URL --model NAME`: the same rows through an OpenAI-compatible server (the vLLM-like fake
    of tests/test_serving.py answering from the same tiny model) as in-process: greedy text and parsed score."""
    from test_serving import FakeVLLM

    from ctiqa.inference import load_model

    fake = FakeVLLM(load_model(str(tiny), precision="fp32"))
    try:
        remote = Scorer.server(fake.url, "tiny", max_new_tokens=40, concurrency=2)
        png = tmp_path / "slice.png"
        Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
        _, got = score_uploads(remote, [CT_SMALL, str(png)])
        _, want = score_uploads(Scorer.load(str(tiny), max_new_tokens=40), [CT_SMALL, str(png)])
        assert [(r["series"], r["rationale"], r["parsed_score"]) for r in got] == \
            [(r["series"], r["rationale"], r["parsed_score"]) for r in want]
        assert all(r["rationale"] for r in got)
        assert fake.requests and all(b["model"] == "tiny" for b in fake.requests)
        assert "at http://127.0.0.1" in remote.name
    finally:
        fake.close()


def test_port_in_use_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """QA #88: `ctiqa app --port N` with N in use loaded the model, then died with `OSError: Cannot find empty
    port`. Now the port is checked first and the error is one line naming it."""
    loads = []
    monkeypatch.setattr(Scorer, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert ctiqa_main(["app", "--port", str(port), "--model", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --port") and f"127.0.0.1:{port}" in err and "\n" not in err
    assert loads == []  # refused before the model was loaded


def test_batch_size_and_budgets_below_1_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """QA round 4: `ctiqa app --batch-size 0` started, and every upload then failed (range() arg 3 must not be zero)."""
    loads = []
    monkeypatch.setattr(Scorer, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    for option in ("--batch-size", "--max-new-tokens", "--concurrency"):
        assert ctiqa_main(["app", option, "0", "--model", str(tmp_path / "model")]) == 2
        assert f"error: {option} must be at least 1" in capsys.readouterr().err
    assert loads == []
