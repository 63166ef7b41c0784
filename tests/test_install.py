"""A non-editable install works: no package code reads files from the checkout (issue 10).

Builds the wheel (``pip wheel --no-deps .``), installs it into a fresh venv that sees the current environment's
dependencies but not its (editable) ctiqa, and runs ``ctiqa predict`` with the default demo model
(``runs/demo/model`` under the current folder) and ``ctiqa evaluate --predictions`` from a folder outside the
checkout.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_non_editable_install_predicts_and_evaluates(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
         tmp_path)
    venv = tmp_path / "venv"
    _run([str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", "--without-pip", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
                .stdout.strip())
    # the dependencies: this environment's site-packages as a plain path (its .pth files, and so an editable
    # install of ctiqa, are not processed)
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    missing = subprocess.run([str(py), "-c", "import ctiqa"], cwd=tmp_path, env=env, capture_output=True)
    assert missing.returncode != 0  # the checkout's ctiqa is not visible
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(next(wheels.glob("ctiqa-*.whl")))],
         tmp_path, env)
    where = _run([str(py), "-c", "import ctiqa; print(ctiqa.__file__)"], tmp_path, env).stdout.strip()
    assert where.startswith(str(site))

    work = tmp_path / "work"
    work.mkdir()
    ctiqa = str(venv / "bin" / "ctiqa")
    err = subprocess.run([ctiqa, "predict", get_testdata_file("CT_small.dcm")], cwd=work, env=env,
                         capture_output=True, text=True)
    assert err.returncode == 2 and "no demo model at" in err.stderr and "runs/demo/model" in err.stderr
    _run([ctiqa, "tiny-model", "--out", "runs/demo/model"], work, env)  # stands in for `make demo`'s model
    _run([ctiqa, "predict", get_testdata_file("CT_small.dcm"), "--score-only", "--out", "scores.jsonl"], work, env)
    rows = [json.loads(line) for line in (work / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["prob_score"] <= 4

    from ctiqa.testing.sft_data import write_dataset

    data = write_dataset(work / "dataset")
    from datasets import load_dataset

    test = load_dataset(str(data), split="test")
    (work / "preds.jsonl").write_text("".join(json.dumps({"id": i, "prediction": round(s + 0.3, 2)}) + "\n"
                                              for i, s in zip(test["id"], test["score"], strict=True)))
    _run([ctiqa, "evaluate", "--predictions", "preds.jsonl", "--dataset", str(data), "--split", "test",
          "--out", "eval", "--bootstrap", "50"], work, env)
    results = json.loads((work / "eval" / "results.json").read_text())
    assert results["metrics"]  # scored every id; the package's metric script was found inside the wheel
