"""Make the README's screenshots of `ctiqa app` and the HTML report (docs/app.png, docs/report.png).

Needs `make demo` first (runs/demo/model, runs/demo/results.json) and Debian's Chromium (`apt-get install chromium`);
run from the repository root:  .venv/bin/python docs/make_screenshots.py

The app is shown scoring a series made of pydicom's CT_small.dcm at five positions with Gaussian noise of
0, 25, 50, 75 and 100 HU added (a stand-in for a dose series; the real data ctiqa ships nothing more of).
Screenshots are quantised to a small palette so each PNG stays well under 200 KB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np


def _series(folder: Path) -> list[str]:
    import pydicom
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(0)
    slope = float(getattr(src, "RescaleSlope", 1) or 1)
    out = []
    for k, sigma_hu in enumerate((0, 25, 50, 75, 100)):
        ds = src.copy()
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        px = ds.pixel_array.astype(np.float64) + rng.normal(0.0, sigma_hu / slope, ds.pixel_array.shape)
        info = np.iinfo(ds.pixel_array.dtype)
        ds.PixelData = np.clip(np.rint(px), info.min, info.max).astype(ds.pixel_array.dtype).tobytes()
        out.append(str(folder / f"slice{k}.dcm"))
        ds.save_as(out[-1])
    return out


def _small_png(src: Path, dst: Path, colors: int = 96) -> None:
    from PIL import Image

    Image.open(src).convert("RGB").quantize(colors=colors).save(dst, optimize=True)
    print(f"wrote {dst} ({dst.stat().st_size / 1024:.0f} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--eval-dir", default="runs/demo", help="a `ctiqa evaluate --out` folder")
    ap.add_argument("--out", default="docs", type=Path)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctiqa-shots-"))
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from playwright.sync_api import sync_playwright

    from ctiqa.app import Scorer, build_app
    from ctiqa.html_report import write_evaluation_report

    files = _series(work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(Scorer.load(args.model, max_new_tokens=160))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    report = write_evaluation_report(args.eval_dir, work / "report.html")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#ctiqa-files input[type=file]").set_input_files(files)
            page.wait_for_timeout(1000)
            page.locator("#ctiqa-score").click()
            page.wait_for_selector("#ctiqa-report table.slices", timeout=300_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(work / "app.png"))
            page = browser.new_page(viewport={"width": 1100, "height": 1250})
            page.goto(report.as_uri())
            page.screenshot(path=str(work / "report.png"))
            browser.close()
    finally:
        demo.close()
    _small_png(work / "app.png", args.out / "app.png")
    _small_png(work / "report.png", args.out / "report.png")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
