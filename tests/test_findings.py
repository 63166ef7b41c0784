"""ctiqa.findings: noise in HU from HU, LDCTIQA [0, 1] and display pixels; streak index; CLI rows."""

import json

import numpy as np
import pytest
import tifffile

from ctiqa import CTIQAError
from ctiqa.cli import main as ctiqa_main
from ctiqa.findings import measure_findings
from ctiqa.imaging import CTImage, hu_to_unit


def _phantom(sigma: float, seed: int = 0, n: int = 128) -> np.ndarray:
    """A water disc (40 HU) in air with a bone rod, plus white Gaussian noise of ``sigma`` HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    hu = np.where(xx**2 + yy**2 < (0.45 * n) ** 2, 40.0, -1000.0)
    hu[(xx - 10) ** 2 + (yy + 5) ** 2 < 36] = 700.0
    return hu + rng.normal(0, sigma, hu.shape)


def test_noise_ranks_and_survives_the_window():
    levels = [10, 20, 40, 80]
    hu = [measure_findings(CTImage(_phantom(s), "hu", "x.dcm")).noise_hu for s in levels]
    assert hu == sorted(hu) and hu[0] > 0
    ratios = np.array(hu) / np.array(levels)
    assert ratios.max() / ratios.min() < 1.15  # linear in sigma: no level-dependent bias
    for s in (20, 40, 80):
        h = _phantom(s, seed=1)
        full = measure_findings(CTImage(h, "hu", "a.dcm")).noise_hu
        unit = measure_findings(CTImage(hu_to_unit(h), "unit", "a.tif")).noise_hu  # LDCTIQA: clipped to W350/L40
        disp = measure_findings(CTImage(np.round(255 * hu_to_unit(h)), "display", "a.png")).noise_hu
        assert unit == pytest.approx(full, rel=0.06) and disp == pytest.approx(full, rel=0.08)


def test_no_soft_tissue_no_noise_and_tiny_image_refused():
    f = measure_findings(CTImage(np.full((64, 64), -1000.0), "hu", "air.dcm"))
    assert f.noise_hu is None and f.noise_severity is None and f.soft_tissue_fraction == 0
    with pytest.raises(CTIQAError, match="tiny.dcm"):
        measure_findings(CTImage(np.zeros((16, 16)), "hu", "tiny.dcm"))


def test_cli_rows(tmp_path, capsys):
    img = tmp_path / "set" / "image"
    img.mkdir(parents=True)
    for i, s in enumerate((15, 60)):
        tifffile.imwrite(img / f"{i:04d}.tif", hu_to_unit(_phantom(s, seed=i)))
    out = tmp_path / "f.jsonl"
    assert ctiqa_main(["findings", str(tmp_path / "set"), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0000", "0001"]
    assert set(rows[0]) >= {"id", "noise_hu", "noise_severity", "streak_index", "streaks"}
    assert rows[0]["noise_hu"] < rows[1]["noise_hu"]
    assert ctiqa_main(["findings", str(tmp_path / "missing.tif")]) == 1
    assert "missing.tif" in capsys.readouterr().err


def test_cli_folder_of_tiff_slices_and_an_unreadable_folder_do_not_end_the_batch(tmp_path, capsys):
    """QA round 4: a folder of TIFF slices (as `ctiqa predict` takes) aborted the whole `ctiqa findings` batch with
    exit 2 and nothing written; an unreadable folder must be one error line, the rest measured."""
    d = tmp_path / "slices"
    d.mkdir()
    for i, s in ((10, 60), (2, 15)):
        tifffile.imwrite(d / f"s{i}.tif", hu_to_unit(_phantom(s, seed=i)))
    (tmp_path / "empty").mkdir()
    out = tmp_path / "f.jsonl"
    assert ctiqa_main(["findings", str(tmp_path / "empty"), str(d), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s2", "s10"] and rows[0]["noise_hu"] < rows[1]["noise_hu"]
    assert "empty" in capsys.readouterr().err


def test_cli_out_never_replaces_a_file_findings_did_not_write(tmp_path, capsys):
    img = tmp_path / "set" / "image"
    img.mkdir(parents=True)
    tifffile.imwrite(img / "0000.tif", hu_to_unit(_phantom(15, seed=0)))
    theirs = tmp_path / "predictions.jsonl"          # e.g. an evaluation's predictions, or any user's jsonl
    theirs.write_text('{"id": "0000", "score": 2.5}\n')
    before = theirs.read_bytes()
    assert ctiqa_main(["findings", str(tmp_path / "set"), "--out", str(theirs)]) == 2
    assert "not written by ctiqa" in capsys.readouterr().err
    assert theirs.read_bytes() == before
    ours = tmp_path / "f.jsonl"                       # an earlier findings file may be replaced by a re-run
    assert ctiqa_main(["findings", str(tmp_path / "set"), "--out", str(ours)]) == 0
    assert ctiqa_main(["findings", str(tmp_path / "set"), "--out", str(ours)]) == 0
    # an input is never the output, even when it looks like findings rows
    assert ctiqa_main(["findings", str(ours), "--out", str(ours)]) == 2
    assert json.loads(ours.read_text().splitlines()[0])["id"] == "0000"


def test_rationale_fields_for_predict_rows():
    from ctiqa.findings import rationale_fields
    from ctiqa.imaging import render

    rgb = render(CTImage(_phantom(12, seed=3), "hu", "a.dcm"))  # low noise (about 15-20 HU measured), no streaks
    assert rationale_fields(rgb, None) == {}  # score-only rows are not measured
    f = rationale_fields(rgb, "Severe noise; prominent ring artifacts and motion.")
    assert f["noise_severity"] in ("none", "mild") and f["noise_hu"] > 0
    assert f["faithfulness_flags"].startswith(f"noise claimed severe, measured {f['noise_severity']}")
    assert f["faithfulness_flags"].endswith("unverified: motion; unverified: ring")
    assert rationale_fields(rgb, "Mild noise, no streaks.")["faithfulness_flags"] == ""  # at most one band off


def test_report_faithfulness_section_says_no_rationale():
    from ctiqa.report import faithfulness_lines

    fa = {"n_measured": 10, "noise_addressed_rate": 1.0, "noise_agreement_rate": 0.7,
          "noise_within_one_band_rate": 0.9, "streaks_addressed_rate": 0.8, "streak_agreement_rate": 0.5,
          "unverified_rate": 0.1, "agreement_with_truth_rubric": {"noise_agree_rate": 0.8, "streaks_agree_rate": 0.6}}
    lines = faithfulness_lines([{"name": "VLM", "faithfulness": fa}, {"name": "noise-sigma", "faithfulness": None}])
    table = "\n".join(lines)
    assert "| VLM | 10 | 1.00 | 0.70 (0.90) | 0.80 | 0.50 | 0.10 | noise 0.80, streaks 0.60 |" in table
    assert "| noise-sigma | no rationale |" in table
    assert faithfulness_lines([{"name": "noise-sigma", "faithfulness": None}]) == []


def test_cli_dicom_folder_ids_hide_file_names(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), series / "1.2.840.113619.2.1.dcm")  # a UID-like file name
    out = tmp_path / "f.jsonl"
    assert ctiqa_main(["findings", str(series), "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["id"] == "series/0" and "1.2.840" not in out.read_text()
    assert 5 < row["noise_hu"] < 20 and row["noise_severity"] == "none"  # a routine-dose slice


def test_cli_dicom_files_given_directly_are_not_named_by_their_uid(tmp_path, capsys):
    """QA #82: UID-named DICOM files given directly (a shell glob of a series) became UID ids on stdout and in
    --out, and an unreadable one was named in the skip message. TIFF stems (LDCTIQA ids) stay ids."""
    import shutil

    from pydicom.data import get_testdata_file

    uids = [tmp_path / f"1.2.840.113619.2.{k}.dcm" for k in (1, 2)]
    for u in uids:
        shutil.copy(get_testdata_file("CT_small.dcm"), u)
    broken = tmp_path / "1.2.840.113619.2.9.dcm"
    broken.write_bytes(b"DICM but not really")
    tif = tmp_path / "0007.tif"
    tifffile.imwrite(tif, hu_to_unit(_phantom(20)))
    out = tmp_path / "f.jsonl"
    assert ctiqa_main(["findings", *map(str, uids), str(broken), str(tif), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["dicom#1", "dicom#2", "0007"]
    assert "1.2.840" not in out.read_text() + captured.out + captured.err
    assert "dicom#3" in captured.err  # the unreadable one is named by its id
    assert ctiqa_main(["findings", str(uids[0]), "--file-names", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["id"] == "1.2.840.113619.2.1"


def test_cli_a_too_small_uid_named_dicom_is_skipped_by_its_id(tmp_path, capsys):
    """QA round 8: a 16x16 DICOM (pydicom's 17136) named by a UID, in a UID-named series folder or given directly,
    was skipped as "too small to measure" with its full path (study, series and SOP UIDs) on stderr."""
    import shutil

    from pydicom.data import get_testdata_file

    series = tmp_path / "1.2.826.0.1.3680043.8.498.1"
    series.mkdir()
    tiny = series / "1.2.826.0.1.3680043.8.498.11111111111111.dcm"
    shutil.copy(get_testdata_file("17136"), tiny)
    for inputs in ([str(series)], [str(tiny)]):
        assert ctiqa_main(["findings", *inputs]) == 1  # nothing measured
        err = capsys.readouterr().err
        assert "too small to measure" in err and "1.2.826" not in err, err


def test_tiff_files_and_slice_folders_named_by_uids_are_not_named_in_the_outputs(tmp_path, capsys):
    """QA round 8: a TIFF named by a SOP Instance UID (slices converted from a PACS export) and a UID folder of such
    TIFFs: predict wrote the file's UID path into rows, summaries and stdout, findings used the UIDs as ids."""
    folder = tmp_path / "1.2.840.113619.2.55.3.99.7"
    folder.mkdir()
    tifffile.imwrite(folder / "1.2.840.113619.2.55.3.99.7.1.tif", hu_to_unit(_phantom(20)))
    single = tmp_path / "1.2.840.113619.2.55.3.604688119.969.320.tif"
    tifffile.imwrite(single, hu_to_unit(_phantom(40)))
    out = tmp_path / "f.jsonl"
    assert ctiqa_main(["findings", str(single), str(folder), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["image#1", "series#1/0"]
    assert "1.2.840" not in out.read_text() + captured.out + captured.err
    assert ctiqa_main(["findings", str(single), "--file-names", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["id"] == single.stem


def test_ids_stay_unique_when_two_inputs_hold_files_of_one_name(tmp_path, capsys):
    """QA round 10: a/x.tif and b/x.tif (or two LDCTIQA-style folders) gave two rows with the id "x" and different
    measurements, with nothing to tell them apart."""
    for k, sigma in ((1, 10), (2, 60)):
        (tmp_path / f"t{k}").mkdir()
        tifffile.imwrite(tmp_path / f"t{k}" / "x.tif", hu_to_unit(_phantom(sigma)))
    out = tmp_path / "f.jsonl"
    assert ctiqa_main(["findings", str(tmp_path / "t1"), str(tmp_path / "t2"), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["x", "x~2"] and rows[0]["noise_hu"] < rows[1]["noise_hu"]
    assert "this one is x~2" in capsys.readouterr().err


def test_findings_of_a_dicom_agree_with_those_of_its_rendering():
    """QA round 8: `ctiqa findings` measured a DICOM's streaks in full-range HU, `ctiqa predict` on the rendered
    image (soft-tissue window): the same slice got two streak indices (7.6 vs 12.7 for CT_small). Both now measure
    in the soft-tissue window, where the threshold was calibrated."""
    from pydicom.data import get_testdata_file

    from ctiqa.findings import measure_rendered
    from ctiqa.imaging import read_ct, render

    img = read_ct(get_testdata_file("CT_small.dcm"))
    a, b = measure_findings(img, "x"), measure_rendered(render(img), "x")
    assert abs(a.streak_index - b.streak_index) < 0.1 * b.streak_index, (a.streak_index, b.streak_index)
    assert a.streaks == b.streaks and abs(a.noise_hu - b.noise_hu) < 1.0


def test_streak_index_sees_views_not_noise_on_an_independent_simulation(tmp_path):
    """Issue 11's bar on a small simulation where n_views and the noise sigma are drawn independently
    (bench/bench_findings.py independent_set: the simulator's physics on the chest and head slices): the streak
    index separates n_views < 256 from >= 512 with AUC > 0.80 on the residual of a linear fit on log(true sigma).
    The noise alone cannot (sigma is independent of the views here), nor could the earlier index (0.60)."""
    import importlib.util
    from pathlib import Path

    from scipy import stats

    from ctiqa.imaging import read_ct

    spec = importlib.util.spec_from_file_location(
        "bench_findings", Path(__file__).resolve().parents[1] / "bench" / "bench_findings.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.independent_set(120, seed=5, root=tmp_path, base_slices=["chest", "head"],
                                cache_dir=tmp_path / "sinograms")
    deg = json.loads((out / "degradations.json").read_text())["images"]
    ids = sorted(deg)
    views = np.array([deg[k]["n_views"] for k in ids])
    sigma = np.array([deg[k]["noise_sigma_hu"] for k in ids])
    assert abs(stats.spearmanr(views, sigma)[0]) < 0.3  # the set decouples views and noise
    index = np.log(np.maximum([measure_findings(read_ct(out / "image" / k)).streak_index for k in ids], 1e-6))
    m = (views < 256) | (views >= 512)
    assert m.sum() > 60 and 20 < (views[m] >= 512).sum()
    assert bench.auc((views < 256)[m], bench.residual(index, sigma)[m]) > 0.80
