"""`ctiqa predict` on users' own CT: a DICOM series folder (with a corrupt file), TIFF and PNG files."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.data import get_testdata_file

from ctiqa.cli import main
from ctiqa.predict import summaries_from_rows


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _series(folder, n=3):
    """n copies of pydicom's CT_small.dcm at different slice positions (written in reverse name order)."""
    folder.mkdir()
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(n):
        ds = src.copy()
        ds.ImagePositionPatient = [0.0, 0.0, float(10 * k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"slice_{n - k:03d}.dcm")
    (folder / "slice_999.dcm").write_bytes(b"DICM but truncated garbage")
    return folder


def test_predict_series_and_files(tiny, tmp_path, capsys):
    series = _series(tmp_path / "series")
    tif = tmp_path / "ldct.tif"
    tifffile.imwrite(tif, np.random.default_rng(0).random((64, 64), dtype=np.float32))
    png = tmp_path / "shot.png"
    Image.fromarray(np.tile(np.uint8([[110, 130]]), (64, 32))).save(png)
    out = tmp_path / "scores.jsonl"
    rc = main(["predict", str(series), str(tif), str(png), "--model", str(tiny), "--out", str(out),
               "--id", "patientA", "--id", "t", "--id", "p", "--max-new-tokens", "8", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert rc == 0
    # the corrupt file is skipped and listed in the output with its reason, but not named (no --file-names)
    assert "skipped patientA: unreadable DICOM" in captured.err and "slice_999" not in captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert [(r["series"], r["slice"]) for r in skipped] == [("patientA", None)]
    assert "unreadable DICOM" in skipped[0]["skipped"] and "slice_999" not in out.read_text()
    rows = [r for r in rows if not r.get("skipped")]
    assert [(r["series"], r["slice"]) for r in rows] == [("patientA", 0), ("patientA", 1), ("patientA", 2),
                                                        ("t", 0), ("p", 0)]
    for r in rows:
        assert 0.0 <= r["prob_score"] <= 4.0 and r["prob_std"] >= 0
        assert isinstance(r["rationale"], str)
    summary = [json.loads(line) for line in (tmp_path / "scores.series.jsonl").read_text().splitlines()]
    assert [s["series"] for s in summary] == ["patientA", "t", "p"]
    a = summary[0]
    scores = [r["prob_score"] for r in rows[:3]]
    assert a["n_slices"] == 3 and a["min"] == pytest.approx(min(scores), abs=1e-4)
    assert a["mean"] == pytest.approx(sum(scores) / 3, abs=1e-4)
    # privacy: nothing from the DICOM header (CT_small's patient name, UIDs) reaches the outputs
    hdr = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    text = out.read_text() + (tmp_path / "scores.series.jsonl").read_text() + captured.out
    for value in (str(hdr.PatientName), str(hdr.SOPInstanceUID), str(hdr.StudyInstanceUID)):
        assert value not in text


def test_score_only_csv_and_unreadable_everything(tiny, tmp_path, capsys):
    good = tmp_path / "a.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), good)
    out = tmp_path / "s.csv"
    assert main(["predict", str(good), "--model", str(tiny), "--score-only", "--out", str(out)]) == 0
    header, row = out.read_text().splitlines()[:2]
    assert header.startswith("series,slice,image_sha256,parsed_score")
    assert row.split(",")[3] == ""  # no generation -> no parsed score
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", str(bad), str(tmp_path / "missing.tif"), "--model", str(tiny)]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "missing.tif" in err


def test_series_summary_prefers_probability_and_counts_unscored_and_skipped():
    rows = [{"series": "x", "slice": 0, "prob_score": 3.0, "parsed_score": 1.0},
            {"series": "y", "slice": 0, "prob_score": 1.0},
            {"series": "x", "slice": 1, "prob_score": None, "parsed_score": 2.0},
            {"series": "x", "slice": 2, "prob_score": None, "parsed_score": None},
            {"series": "x", "slice": 3, "prob_score": 2.5},
            {"series": "x", "slice": None, "skipped": "unreadable"}]
    x, y = summaries_from_rows(rows, ["x", "y", "z"])
    assert (x["series"], x["n_slices"], x["n_unscored"], x["n_skipped"]) == ("x", 4, 1, 1)
    assert x["mean"] == 2.5 and x["min"] == 2.0
    assert x["worst_slices"] == [{"slice": 1, "score": 2.0}, {"slice": 3, "score": 2.5}, {"slice": 0, "score": 3.0}]
    assert (y["series"], y["mean"], y["n_skipped"]) == ("y", 1.0, 0)


def test_folder_with_two_series_file_names_and_nothing_readable(tiny, tmp_path, capsys):
    """A folder holding two series is scored as two (told apart by Series Instance UID, which never reaches the
    output); --file-names adds the files; nothing readable -> exit 1 before any model is loaded."""
    folder = _series(tmp_path / "mixed", n=2)
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    other = src.copy()
    other.SeriesInstanceUID = "1.2.3.4.5.6.7"
    other.ImagePositionPatient, other.ImageOrientationPatient = [0.0, 0.0, 0.0], [1, 0, 0, 0, 1, 0]
    other.save_as(folder / "zz_other.dcm")
    out = tmp_path / "s.jsonl"
    assert main(["predict", str(folder), "--model", str(tiny), "--score-only", "--file-names", "--out",
                 str(out)]) == 0
    captured = capsys.readouterr()
    assert "holds 2 DICOM series" in captured.err and "1.2.3.4.5.6.7" not in captured.err + captured.out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["file"], r["slice"]) for r in rows if r.get("skipped")] == [(str(folder / "slice_999.dcm"), None)]
    assert f"skipped {folder / 'slice_999.dcm'}:" in captured.err  # --file-names: the file is named
    rows = [r for r in rows if not r.get("skipped")]
    assert [(r["series"], r["file"]) for r in rows] == [(f"{folder}#1", "slice_002.dcm"),
                                                       (f"{folder}#1", "slice_001.dcm"),
                                                       (f"{folder}#2", "zz_other.dcm")]
    summary = [json.loads(line) for line in (tmp_path / "s.series.jsonl").read_text().splitlines()]
    assert [(s["series"], s["n_slices"], s["n_skipped"]) for s in summary] == [(f"{folder}#1", 2, 1),
                                                                               (f"{folder}#2", 1, 0)]
    assert "file" in summary[0]["worst_slices"][0]
    # default: no file names in the outputs
    out2 = tmp_path / "s2.jsonl"
    assert main(["predict", str(folder), "--model", str(tiny), "--score-only", "--out", str(out2)]) == 0
    assert all("file" not in json.loads(line) for line in out2.read_text().splitlines())
    assert "slice_999" not in capsys.readouterr().err
    capsys.readouterr()
    # nothing readable: the (missing) model is never loaded
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), str(tmp_path / "nope.dcm"), "--model", str(tmp_path / "no-model")]) == 1
    err = capsys.readouterr().err
    assert "empty" in err and "nope.dcm" in err and "nothing to score" in err and "no-model" not in err


def test_wrong_model_or_adapter_folder_is_named(tiny, tmp_path, capsys):
    good = tmp_path / "a.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), good)
    assert main(["predict", str(good), "--model", str(tmp_path / "no_such_model")]) == 2
    assert "no_such_model: no such folder" in capsys.readouterr().err
    assert main(["predict", str(good), "--adapter", str(tmp_path / "no_adapter")]) == 2
    assert "no_adapter: no such folder" in capsys.readouterr().err
    assert main(["predict", str(good), "--model", str(tiny), "--adapter", str(tmp_path)]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def _count_backend(monkeypatch, fail_after=None):
    """Wrap predict.model_backend: record each batch's size; raise (as a kill would stop it) after N batches."""
    import ctiqa.predict as predict

    calls: list[int] = []
    real = getattr(predict.model_backend, "original", predict.model_backend)

    def wrapped(*a, **kw):
        score = real(*a, **kw)

        def counted(images):
            if fail_after is not None and len(calls) >= fail_after:
                raise RuntimeError("killed")
            calls.append(len(images))
            return score(images)

        return counted

    wrapped.original = real
    monkeypatch.setattr(predict, "model_backend", wrapped)
    return calls


def test_rows_stream_and_a_killed_run_resumes(tiny, tmp_path, monkeypatch, capsys):
    """Each batch's rows are on disk as soon as it is scored; after a kill a re-run scores only what is left."""
    folder = _series(tmp_path / "series", n=5)
    out = tmp_path / "scores.csv"
    args = ["predict", str(folder), "--model", str(tiny), "--score-only", "--batch-size", "2", "--out", str(out)]
    calls = _count_backend(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    import csv

    kept = list(csv.DictReader(out.open()))
    assert [r["slice"] for r in kept if not r["skipped"]] == ["0", "1", "2", "3"] and calls == [2, 2]
    with open(out, "a") as f:  # a kill in the middle of writing a row leaves a fragment
        f.write(f"{folder},4,,2.3")
    calls = _count_backend(monkeypatch)
    assert main(args) == 0
    assert calls == [1]  # only slice 4 was scored again
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["slice"] for r in rows if not r["skipped"]) == ["0", "1", "2", "3", "4"]
    assert sum(1 for r in rows if r["skipped"]) == 1  # the corrupt file is listed once, not once per run
    summary = [json.loads(json.dumps(r)) for r in csv.DictReader((tmp_path / "scores.series.csv").open())]
    assert summary[0]["n_slices"] == "5" and summary[0]["n_skipped"] == "1"
    assert "resumed: 4 slice(s)" in capsys.readouterr().err
    # a run with another setting into the same --out is refused before any work, naming what differs
    calls = _count_backend(monkeypatch)
    assert main(args[:-2] + ["--encoding", "medgemma-3window", "--out", str(out)]) == 2
    assert "encoding: 'soft-tissue' then, 'medgemma-3window' now" in capsys.readouterr().err and calls == []


def test_bad_out_and_batch_size_fail_before_the_model_loads(tmp_path, capsys):
    good = tmp_path / "a.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), good)
    no_model = str(tmp_path / "no_such_model")
    for extra, message in ((["--out", str(tmp_path)], "is a folder"),
                           (["--out", str(tmp_path / "x.txt")], "must end in .jsonl or .csv"),
                           (["--batch-size", "0"], "--batch-size and --max-new-tokens must be at least 1")):
        assert main(["predict", str(good), "--model", no_model, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "no_such_model" not in err, err
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"my": "data"}\n')
    assert main(["predict", str(good), "--model", no_model, "--out", str(foreign)]) == 2
    assert "not written by ctiqa predict" in capsys.readouterr().err
    assert foreign.read_text() == '{"my": "data"}\n'  # never overwritten


def test_companion_files_of_out_and_repeated_ids_are_refused_before_any_work(tmp_path, capsys):
    good = tmp_path / "a.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), good)
    no_model = str(tmp_path / "no_such_model")
    out = tmp_path / "out.csv"
    for name, text in (("out.series.csv", "patient,my,notes\n1,2,3\n"), ("out.run.json", '{"my": "settings"}\n')):
        theirs = tmp_path / name
        theirs.write_text(text)
        assert main(["predict", str(good), "--model", no_model, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert name in err and "not written by ctiqa" in err and "no_such_model" not in err, err
        assert theirs.read_text() == text and not out.exists()  # nothing written, nothing replaced
        theirs.unlink()
    series = tmp_path / "out.series.jsonl"  # the .jsonl --out has its own series file
    series.write_text('{"mine": 1}\n')
    assert main(["predict", str(good), "--model", no_model, "--out", str(tmp_path / "out.jsonl")]) == 2
    assert series.read_text() == '{"mine": 1}\n'
    # two inputs under one --id would be merged into one series: refused before anything is read or written
    assert main(["predict", str(good), str(good), "--id", "A", "--id", "A", "--model", no_model,
                 "--out", str(tmp_path / "ids.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--id 'A' given for more than one input" in err and "no_such_model" not in err, err
    assert main(["predict", str(good), str(good), "--id", "", "--id", "B", "--model", no_model]) == 2  # QA round 10
    assert "an empty id" in capsys.readouterr().err
    assert not (tmp_path / "ids.jsonl").exists() and not (tmp_path / "ids.run.json").exists()


def test_out_beside_a_row_file_of_another_suffix_is_refused(tmp_path, capsys):
    """QA round 8: `--out S.csv` after `--out S.jsonl` rewrote the shared S.run.json, so a resume of S.jsonl with
    another model kept the first model's rows (wrong scores, exit 0). Refused before any work, files unchanged."""
    good = tmp_path / "a.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), good)
    first, run = tmp_path / "S.jsonl", tmp_path / "S.run.json"
    first.write_text('{"series": "x"}\n')
    run.write_text('{"model": "A"}\n')
    for other in ("S.csv", "S.json"):
        assert main(["predict", str(good), "--model", str(tmp_path / "no_such_model"), "--out",
                     str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert "S.jsonl exists beside it" in err and "no_such_model" not in err, err
        assert not (tmp_path / other).exists() and run.read_text() == '{"model": "A"}\n'


def test_two_inputs_that_would_share_a_series_id_are_refused(tmp_path, capsys):
    """QA round 8: a folder X of two DICOM series is scored as X#1 and X#2; a sibling folder named "X#1" (or
    `--id S --id S#2`) got the same id, and the two were merged into one series summary (exit 0)."""
    folder = _series(tmp_path / "X", n=2)
    other = pydicom.dcmread(folder / "slice_001.dcm")
    other.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12"
    other.save_as(folder / "other.dcm")  # X now holds two series
    sibling = tmp_path / "X#1"
    sibling.mkdir()
    tifffile.imwrite(sibling / "0000.tif", np.random.default_rng(0).random((64, 64), dtype=np.float32))
    tif = tmp_path / "t.tif"
    tifffile.imwrite(tif, np.random.default_rng(1).random((64, 64), dtype=np.float32))
    no_model = str(tmp_path / "no_such_model")
    for extra in ([str(folder), str(sibling)], [str(folder), str(tif), "--id", "S", "--id", "S#2"]):
        out = tmp_path / "o.jsonl"
        assert main(["predict", *extra, "--model", no_model, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "inputs 1 and 2 would both be scored as series" in err and "no_such_model" not in err, err
        assert not out.exists() or out.stat().st_size == 0  # no row (--out is opened, empty, before indexing)


def test_a_skipped_slice_fixed_before_the_resume_is_scored_not_kept_skipped(tiny, tmp_path, monkeypatch, capsys):
    """QA round 8: a slice skipped in a first run (a truncated TIFF) and fixed before the re-run was scored but its
    "skipped" row stayed: slice 1 twice in the rows and n_skipped 1 in the series summary (exit 0). Skipped rows
    are done again by a resume; one still unreadable is skipped again, once."""
    folder = tmp_path / "s"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = [rng.random((64, 64), dtype=np.float32) for _ in range(3)]
    for k, a in enumerate(good):
        tifffile.imwrite(folder / f"{k:04d}.tif", a)
    whole = (folder / "0001.tif").read_bytes()
    (folder / "0001.tif").write_bytes(whole[:3000])
    out = tmp_path / "o.jsonl"
    args = ["predict", str(folder), "--model", str(tiny), "--score-only", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["slice"], bool(r.get("skipped"))) for r in rows) == [(0, False), (1, True), (2, False)]
    assert main(args) == 0  # still unreadable: skipped again, once
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["slice"], bool(r.get("skipped"))) for r in rows) == [(0, False), (1, True), (2, False)]
    (folder / "0001.tif").write_bytes(whole)  # fixed
    calls = _count_backend(monkeypatch)
    assert main(args) == 0 and sum(calls) == 1  # only slice 1 is scored
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["slice"], bool(r.get("skipped"))) for r in rows) == [(0, False), (1, False), (2, False)]
    summary = json.loads((tmp_path / "o.series.jsonl").read_text())
    assert (summary["n_slices"], summary["n_skipped"]) == (3, 0)


def test_a_tiff_named_by_a_uid_is_not_named_in_the_outputs(tiny, tmp_path, capsys):
    """QA round 8: a UID-named TIFF file input kept its path (study/SOP UIDs) as the series id in rows, the series
    summary and the printed tables; UID folders were already series#K."""
    single = tmp_path / "1.2.840.113619.2.55.3.604688119.969.320.tif"
    tifffile.imwrite(single, np.random.default_rng(0).random((64, 64), dtype=np.float32))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(single), "--model", str(tiny), "--score-only", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = out.read_text() + (tmp_path / "p.series.jsonl").read_text() + captured.out + captured.err
    assert "1.2.840" not in text and json.loads(out.read_text().splitlines()[0])["series"] == "series#1"


def test_a_resume_with_file_names_refuses_renamed_slices(tiny, tmp_path, capsys):
    """QA round 8: with --file-names, a.tif -> 0.tif and b.tif -> a.tif (same images, same order) resumed: the rows
    kept saying a.tif for the first image's score and b.tif (gone) for the second's (exit 0)."""
    folder = tmp_path / "s"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(folder / name, rng.random((64, 64), dtype=np.float32))
    out = tmp_path / "o.jsonl"
    args = ["predict", str(folder), "--model", str(tiny), "--score-only", "--file-names", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    (folder / "a.tif").rename(folder / "0.tif")
    (folder / "b.tif").rename(folder / "a.tif")
    capsys.readouterr()
    assert main(args) == 2
    assert "renamed" in capsys.readouterr().err and out.read_bytes() == before
    assert main([a for a in args if a != "--file-names"][:-1] + [str(tmp_path / "n.jsonl")]) == 0  # no names: fine


def test_a_dicom_instance_given_twice_in_a_folder_counts_once(tmp_path, capsys):
    """QA round 10: a series folder holding the same instance twice (a copied file, a backup sub-folder) was scored
    as an extra slice: n_slices 3 for a 2-slice series and the slice twice in the summary (exit 0)."""
    from ctiqa.imaging import index_dicom_folder, read_dicom_folder

    folder = _series(tmp_path / "s", n=2)
    (folder / "slice_999.dcm").unlink()
    shutil.copy(folder / "slice_001.dcm", folder / "slice_001 copy.dcm")
    (folder / "backup").mkdir()
    shutil.copy(folder / "slice_002.dcm", folder / "backup" / "slice_002.dcm")
    for read in (index_dicom_folder, read_dicom_folder):
        errors: list = []
        series = read(folder, errors=errors)
        assert len(series) == 1 and len(series[0]) == 2
        assert len(errors) == 2 and all("same SOP Instance UID" in m for _, m in errors)


def test_every_skipped_file_of_a_series_folder_is_listed(tmp_path, capsys):
    """QA round 10: a DICOM series folder holding 3 TIFFs listed only the first as skipped (one reason, so the other
    two were taken for repeats), and two DICOM files cut inside their headers became a phantom second series."""
    from ctiqa.predict import gather_series

    folder = _series(tmp_path / "s", n=2)  # plus slice_999.dcm: garbage
    for k in range(3):
        tifffile.imwrite(folder / f"{k:04d}.tif", np.zeros((32, 32), np.float32))
    whole = (folder / "slice_001.dcm").read_bytes()
    for k in range(2):
        (folder / f"cut_{k}.dcm").write_bytes(whole[:1000])
    series = gather_series([str(folder)])
    assert len(series) == 1 and len(series[0].refs) == 2  # no phantom series from the cut headers
    assert len(series[0].errors) == 6  # 3 TIFFs, 2 cut files, the garbage file
    assert main(["predict", str(folder), "--model", str(tmp_path / "no_such_model"), "--out",
                 str(tmp_path / "o.jsonl")]) == 2  # the model is loaded after the skips are written
    skipped = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len([r for r in skipped if r.get("skipped")]) == 6


def test_a_folder_spelt_otherwise_resumes(tiny, tmp_path, monkeypatch, capsys):
    """QA round 10: `predict /x/s` then `predict /x/s/` (tab completion), a relative spelling or a link to it, with
    the same --out, scored every slice again and appended it as a new series (the series twice in the outputs)."""
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(2):
        tifffile.imwrite(folder / f"{k:04d}.tif", np.random.default_rng(k).random((64, 64), dtype=np.float32))
    (tmp_path / "link").symlink_to(folder)
    out = tmp_path / "o.jsonl"
    args = ["--model", str(tiny), "--score-only", "--out", str(out)]
    assert main(["predict", str(folder), *args]) == 0
    before = out.read_bytes()
    calls = _count_backend(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for spelling in (str(folder) + "/", "./s", "link"):
        assert main(["predict", spelling, *args]) == 0
        assert calls == [] and out.read_bytes() == before, spelling
    summary = [json.loads(x) for x in (tmp_path / "o.series.jsonl").read_text().splitlines()]
    assert [s["series"] for s in summary] == [str(folder)]


def test_a_resume_of_an_out_file_resaved_or_edited_is_one_line_or_resumes(tiny, tmp_path, monkeypatch, capsys):
    """QA round 10: a CSV re-saved by Excel (a UTF-8 BOM) or pandas (slice 0.0), a JSONL with a hand-added line, or a
    score edited to 9.9 ended the resume in a traceback or kept the impossible score in the series mean."""
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(2):
        tifffile.imwrite(folder / f"{k:04d}.tif", np.random.default_rng(k).random((64, 64), dtype=np.float32))
    args = ["predict", str(folder), "--model", str(tiny), "--score-only", "--out"]
    for name in ("bom.csv", "f.csv", "j.jsonl", "e.jsonl"):
        assert main([*args, str(tmp_path / name)]) == 0
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    f = tmp_path / "f.csv"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text(lines[0] + lines[1].replace(",0,", ",0.0,", 1) + "".join(lines[2:]))
    # QA round 12: line ends doubled by an editor (\r\r\n) were taken for a cut: every slice scored again
    assert main([*args, str(tmp_path / "d.csv")]) == 0
    (tmp_path / "d.csv").write_bytes((tmp_path / "d.csv").read_bytes().replace(b"\r\n", b"\r\r\n"))
    calls = _count_backend(monkeypatch)
    for name in ("bom.csv", "f.csv", "d.csv"):
        assert main([*args, str(tmp_path / name)]) == 0 and calls == [], name
    j = tmp_path / "j.jsonl"
    j.write_text(j.read_text() + '{"note": "checked by Dr X"}\n')
    e = tmp_path / "e.jsonl"
    e.write_text(e.read_text().replace('"prob_score": ', '"prob_score": 9', 1))
    capsys.readouterr()
    for path, why in ((j, "row 3 has no 'series'"), (e, "has prob_score 9")):
        before = path.read_bytes()
        assert main([*args, str(path)]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and path.read_bytes() == before, err


def test_a_link_to_nothing_in_a_folder_is_listed_not_dropped(tmp_path):
    """QA round 12: a slice that is a symbolic link onto an unmounted volume was left out without a word: the next
    slice took its place and the summary said n_skipped 0 (TIFF folder and DICOM series folder alike)."""
    from ctiqa.predict import gather_series

    tiffs = tmp_path / "t"
    tiffs.mkdir()
    for k in (0, 1, 3):
        tifffile.imwrite(tiffs / f"{k:04d}.tif", np.zeros((32, 32), np.float32))
    (tiffs / "0002.tif").symlink_to(tmp_path / "unmounted" / "0002.tif")
    dicoms = _series(tmp_path / "d", n=2)
    (dicoms / "slice_777.dcm").symlink_to(tmp_path / "unmounted" / "x.dcm")
    t, d = gather_series([str(tiffs), str(dicoms)])
    assert [r.name for r in t.refs] == ["0000.tif", "0001.tif", "0002.tif", "0003.tif"]  # it keeps its place
    assert any("broken symlink" in m for _, m in d.errors) and len(d.refs) == 2


def test_memory_is_flat_in_the_number_of_slices(tmp_path):
    """A folder is indexed from headers only and at most one batch of slices is alive while scoring."""
    import gc

    from ctiqa.imaging import CTImage
    from ctiqa.predict import RowSink, gather_series, score_series

    folder = _series(tmp_path / "big", n=24)
    series = gather_series([str(folder)])
    assert sum(len(s.refs) for s in series) == 24
    assert not any(type(o) is CTImage for o in gc.get_objects())  # nothing read yet
    alive = []

    def backend(images):
        gc.collect()
        alive.append(sum(type(o) is CTImage for o in gc.get_objects()))
        return [{"prob_score": 2.0, "prob_std": 0.1, "extra_field": 1} for _ in images]

    rows = []
    sink = RowSink(None, {}, False)
    counts = score_series(series, backend, sink, encoding="soft-tissue", batch_size=4, on_row=rows.append)
    assert counts == {"scored": 24, "resumed": 0, "skipped": 1, "failed": 0} and len(alive) == 6
    assert max(alive) <= 4
    assert all(r["extra_field"] == 1 for r in rows if not r.get("skipped"))  # backend keys are kept


def _noisy_slice(path, z, seed):
    """CT_small at slice position z with seeded noise: a slice whose content (and fake score) depends on seed."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    px = ds.pixel_array.astype(np.int32) + np.random.default_rng(seed).integers(0, 40 * seed + 1, ds.pixel_array.shape)
    ds.PixelData = np.clip(px, 0, 4000).astype(ds.pixel_array.dtype).tobytes()
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(z)], [1, 0, 0, 0, 1, 0]
    ds.save_as(path)


def _content_backend(images):
    """A fake model whose score is a function of the image content (mean grey / 64)."""
    return [{"prob_score": float(np.asarray(im, dtype=np.float64).mean() / 64), "prob_std": 0.1} for im in images]


def _run(folder, out):
    from ctiqa.predict import RowSink, gather_series, score_series

    sink = RowSink(out, {"model": "fake"}, False)
    try:
        counts = score_series(gather_series([str(folder)]), _content_backend, sink, encoding="soft-tissue",
                              batch_size=2)
    finally:
        sink.close()
    return counts, [r for r in sink.read() if not r.get("skipped")]


def _truth(folder):
    """(slice, score) the fake model gives each slice of the folder as it is now, by slice position."""
    from ctiqa.imaging import read_dicom_folder, render

    (series,) = read_dicom_folder(folder)
    return [(i, pytest.approx(_content_backend([render(img)])[0]["prob_score"])) for i, (_, img) in enumerate(series)]


def test_resume_is_keyed_on_content_not_on_slice_index(tmp_path):
    """QA #77/#78: a re-run into the same --out after files of a series changed (or slices were inserted) said
    "resumed" and kept the old scores under the new slices. Now every row's score is the score of the slice at that
    position as it is now; a changed series is refused by name before anything is scored."""
    from ctiqa import CTIQAError

    folder = tmp_path / "1.2.840.99"
    folder.mkdir()
    for k in range(4):
        _noisy_slice(folder / f"1.2.840.99.{k}.dcm", 10 * k, seed=k)
    out = tmp_path / "scores.jsonl"
    counts, rows = _run(folder, out)
    assert counts["scored"] == 4 and [(r["slice"], r["prob_score"]) for r in rows] == _truth(folder)

    _noisy_slice(folder / "1.2.840.99.4.dcm", 40, seed=4)  # a slice added after the last: scored, the rest kept
    counts, rows = _run(folder, out)
    assert (counts["scored"], counts["resumed"]) == (1, 4)
    assert [(r["slice"], r["prob_score"]) for r in rows] == _truth(folder)

    before = out.read_text()
    _noisy_slice(folder / "1.2.840.99.2.dcm", 20, seed=9)  # same name, same position, new pixels
    with pytest.raises(CTIQAError, match=r"content has changed.*series#1 \(slice 2\)"):  # its UID-named folder
        _run(folder, out)
    assert out.read_text() == before  # refused before anything was written

    _noisy_slice(folder / "1.2.840.99.2.dcm", 20, seed=2)  # restored: resumes again
    assert _run(folder, out)[0]["resumed"] == 5
    _noisy_slice(folder / "1.2.840.99.x.dcm", 5, seed=7)  # inserted between slices 0 and 1: positions move
    with pytest.raises(CTIQAError, match=r"series#1 \(slices 1, 2, 3, 4\)"):
        _run(folder, out)
    (folder / "1.2.840.99.x.dcm").unlink()
    (folder / "1.2.840.99.4.dcm").unlink()  # a scored slice removed: its row would be stale
    with pytest.raises(CTIQAError, match=r"series#1 \(slice 4\)"):
        _run(folder, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(r["image_sha256"]) == 64 and "1.2.840.99." not in json.dumps(r) for r in rows)  # no file names


def test_dicom_file_inputs_are_not_named_by_their_uid_file_name(tiny, tmp_path, capsys):
    """QA #71: `ctiqa predict /path/1.2.840.999.dcm` put the UID-named path in the series field and table."""
    uid_file = tmp_path / "1.2.840.999.1.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), uid_file)
    tif = tmp_path / "ldct_0007.tif"
    tifffile.imwrite(tif, np.random.default_rng(0).random((64, 64), dtype=np.float32))
    out = tmp_path / "s.jsonl"
    assert main(["predict", str(uid_file), str(tif), "--model", str(tiny), "--score-only", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["series"] for r in rows] == ["dicom#1", str(tif)]
    text = out.read_text() + (tmp_path / "s.series.jsonl").read_text() + captured.out + captured.err
    assert "1.2.840.999" not in text
    out2 = tmp_path / "named.jsonl"
    assert main(["predict", str(uid_file), "--model", str(tiny), "--score-only", "--out", str(out2),
                 "--file-names"]) == 0
    assert json.loads(out2.read_text().splitlines()[0])["series"] == str(uid_file)


def test_a_second_input_set_into_one_out_is_summarised_with_the_first(tiny, tmp_path, monkeypatch, capsys):
    """QA round 3: `predict A --out X` then `predict B --out X` kept both slice sets in X but wrote only B's series
    summary: the summary file disagreed with the rows beside it. Now it covers every series X holds."""
    a, b = _series(tmp_path / "a", n=2), _series(tmp_path / "b", n=1)
    out = tmp_path / "x.jsonl"
    base = ["--model", str(tiny), "--score-only", "--out", str(out)]
    assert main(["predict", str(a), *base]) == 0
    calls = _count_backend(monkeypatch)
    assert main(["predict", str(b), *base]) == 0
    assert calls == [1]  # only b's slice scored
    assert "also holds 1 series of an earlier run" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = [json.loads(line) for line in (tmp_path / "x.series.jsonl").read_text().splitlines()]
    assert [s["series"] for s in summary] == [str(a), str(b)]
    for s in summary:
        scores = [r["prob_score"] for r in rows if r["series"] == s["series"] and not r.get("skipped")]
        assert s["n_slices"] == len(scores) and s["mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)


def test_a_folder_of_tiff_slices_is_one_series_and_an_input_given_twice_is_scored_once(tiny, tmp_path, monkeypatch,
                                                                                        capsys):
    """LDCTIQA itself is a folder of TIFF slices: it was refused as 'no readable DICOM slices'. Slices are taken in
    natural name order (2 before 10). The same folder typed twice (`d` and `d/`) was scored twice."""
    d = tmp_path / "slices"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("S10.tif", "s2.tif", "s1.tif"):  # case does not change the order (QA 5)
        tifffile.imwrite(d / name, rng.random((64, 64), dtype=np.float32))
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    tifffile.imwrite(d / "sub" / "s3.tif", rng.random((64, 64), dtype=np.float32))  # not a slice here: listed
    out = tmp_path / "x.jsonl"
    calls = _count_backend(monkeypatch)
    assert main(["predict", str(d), str(d) + "/", "--model", str(tiny), "--score-only", "--file-names",
                 "--batch-size", "8", "--out", str(out)]) == 0
    assert "was given before; scored once" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in rows if r.get("skipped")) == [str(d / "notes.txt"), str(d / "sub" / "s3.tif")]
    assert "sub-folder" in next(r["skipped"] for r in rows if r.get("file", "").endswith("s3.tif"))
    rows = [r for r in rows if not r.get("skipped")]
    assert calls == [3] and [(r["series"], r["slice"], r["file"]) for r in rows] == [
        (str(d), 0, "s1.tif"), (str(d), 1, "s2.tif"), (str(d), 2, "S10.tif")]
    one = main(["predict", str(d / "s2.tif"), "--model", str(tiny), "--score-only", "--out", str(tmp_path / "y.jsonl")])
    assert one == 0
    alone = json.loads((tmp_path / "y.jsonl").read_text())
    assert alone["prob_score"] == pytest.approx(rows[1]["prob_score"], abs=1e-4)  # same slice, same score


def test_a_name_too_long_is_skipped_and_ctrl_c_says_how_to_resume(tiny, tmp_path, monkeypatch, capsys):
    """QA round 3: an input name over 255 bytes ended the whole run in a traceback; Ctrl-C printed a traceback."""
    good = tmp_path / "a.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), good)
    out = tmp_path / "x.jsonl"
    assert main(["predict", str(tmp_path / ("y" * 300 + ".dcm")), str(good), "--model", str(tiny), "--score-only",
                 "--out", str(out)]) == 0
    assert "name too long" in capsys.readouterr().err
    assert sum(1 for line in out.read_text().splitlines() if "prob_score" in line) == 1
    import ctiqa.predict as predict

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "score_series", interrupted)
    assert main(["predict", str(good), "--model", str(tiny), "--score-only", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"kept in {out}; the same command resumes" in err, err


def test_a_csv_cut_inside_a_rationale_resumes(tiny, tmp_path, monkeypatch):
    """QA round 4: a rationale holds newlines inside its quoted CSV field. A kill (or a full disk) that cut the file
    inside one left a fragment the old cut-line rule (back to the last newline) could not see: the re-run appended
    rows into the open quote and every later run crashed (ValueError), the scored rows lost to ctiqa. Cut rows are
    now dropped and scored again; the file stays a valid CSV with one whole row per slice."""
    import csv

    import ctiqa.predict as predict

    calls: list[int] = []

    def backend(*a, **kw):
        def score(images):
            calls.append(len(images))
            return [{"text": f"Score: 2.{k}\nReasoning: moderate noise,\nno \"streaks\".", "parsed_score": 2.0 + k / 10,
                     "parse_rule": "score_line", "prob_score": 2.0, "prob_std": 0.1} for k in range(len(images))]
        return score

    monkeypatch.setattr(predict, "model_backend", backend)
    folder = _series(tmp_path / "series", n=3)
    out = tmp_path / "x.csv"
    args = ["predict", str(folder), "--model", str(tiny), "--batch-size", "1", "--out", str(out)]
    assert main(args) == 0 and calls == [1, 1, 1]
    whole = out.read_bytes()

    def rows():
        return [r for r in csv.DictReader(out.open(newline="")) if not r["skipped"]]

    expected = rows()
    last = whole.rindex(b"Reasoning:")
    for cut, rescored in ((whole.index(b"\n", last) + 1, [1]),  # right after a newline inside the last rationale
                          (whole.index(b"Reasoning:") + 14, [1, 1, 1]),  # inside the first slice's rationale
                          (whole.rindex(b"\r\n") - 1, [1])):  # the last field whole but no row terminator
        out.write_bytes(whole[:cut])
        calls.clear()
        assert main(args) == 0
        assert calls == rescored, (cut, calls)
        assert rows() == expected  # every slice once, each rationale whole
        records = lambda b: sorted(map(tuple, csv.reader(io.StringIO(b.decode()))))  # noqa: E731
        assert records(out.read_bytes()) == records(whole)  # the skipped file's row is written again, at the end


def test_a_model_replaced_at_the_same_path_is_never_resumed_as_the_old_one(tiny, tmp_path, monkeypatch, capsys):
    """Hostile QA: a re-run after another model was saved into the same --model folder (a training run re-saving
    into its output_dir) said "resumed" and kept the old model's scores as the new one's. Resume is keyed on the
    weights (ctiqa.model_settings.weights_fingerprint), not on the path: refused in one line, nothing changed; the
    same model still resumes without scoring anything, and a run.json written before the key existed too."""
    from ctiqa.tiny import build_tiny_model

    folder = _series(tmp_path / "series", n=2)
    model = shutil.copytree(tiny, tmp_path / "model")
    out = tmp_path / "s.jsonl"
    args = ["predict", str(folder), "--model", str(model), "--score-only", "--out", str(out)]
    assert main(args) == 0
    old = [r["prob_score"] for r in map(json.loads, out.read_text().splitlines()) if not r.get("skipped")]
    capsys.readouterr()
    calls = _count_backend(monkeypatch)
    assert main(args) == 0 and calls == [] and "resumed: 2 slice(s)" in capsys.readouterr().err
    run_file = tmp_path / "s.run.json"
    legacy = json.loads(run_file.read_text())
    del legacy["model_weights"]  # as written before the weights were recorded: resumes as before
    run_file.write_text(json.dumps(legacy))
    assert main(args) == 0 and calls == [] and "resumed: 2 slice(s)" in capsys.readouterr().err
    assert json.loads(run_file.read_text())["model_weights"]

    shutil.copytree(build_tiny_model(tmp_path / "other", seed=1), model, dirs_exist_ok=True)  # re-saved in place
    files = {p.name: p.read_bytes() for p in tmp_path.glob("s.*")}
    capsys.readouterr()
    assert main(args) == 2 and calls == []
    err = capsys.readouterr().err
    assert "model weights: changed since the rows in s.jsonl were scored" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.glob("s.*")} == files
    # the refusal matters: the model now at that path scores these slices otherwise
    assert main([*args[:-1], str(tmp_path / "new.jsonl")]) == 0
    new = [r["prob_score"] for r in map(json.loads, (tmp_path / "new.jsonl").read_text().splitlines())
           if not r.get("skipped")]
    assert new != pytest.approx(old, abs=1e-3)
    # another model folder: the message names the model, not "weights changed" (QA round 8)
    capsys.readouterr()
    assert main([*args[:3], str(tiny), *args[4:]]) == 2
    err = capsys.readouterr().err
    assert f"model: '{model}' then, '{tiny}' now" in err and "weights" not in err, err


def test_a_series_folder_named_by_its_uid_is_not_named_in_the_outputs(tiny, tmp_path, capsys):
    """QA round 4: PACS exports name study and series folders by their UIDs; `ctiqa predict STUDY_UID/SERIES_UID`
    put that path (DICOM metadata) into the rows, the series summary, the HTML page and stdout, as `findings` did
    into its ids. Such a path is now `series#K` unless --id or --file-names."""
    study, series_uid = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.11"
    (tmp_path / study).mkdir()
    folder = _series(tmp_path / study / series_uid, n=2)
    other = pydicom.dcmread(folder / "slice_001.dcm")
    other.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.12"  # a second series: its note named the folder (QA 5)
    other.save_as(folder / "other.dcm")
    out = tmp_path / "x.jsonl"
    assert main(["predict", str(folder), "--model", str(tiny), "--score-only", "--out", str(out),
                 "--html", str(tmp_path / "x.html")]) == 0
    assert main(["findings", str(folder), "--out", str(tmp_path / "f.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "is named series#1" in captured.err
    for text in (out.read_text(), (tmp_path / "x.series.jsonl").read_text(), (tmp_path / "x.html").read_text(),
                 (tmp_path / "f.jsonl").read_text(), captured.out, captured.err):
        assert "1.2.826.0.1.3680043" not in text
    assert {json.loads(line)["series"] for line in out.read_text().splitlines()} == {"series#1#1", "series#1#2"}


def test_score_only_with_a_format_that_does_not_start_with_the_score_is_refused(tiny, tmp_path, capsys):
    """QA round 4: `predict --score-only --format rationale-first` gave rows with no score and exit 0, no reason."""
    good = tmp_path / "a.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), good)
    assert main(["predict", str(good), "--model", str(tiny), "--score-only", "--format", "rationale-first",
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "format 'rationale-first' does not" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_file_names_that_are_not_utf8_reach_every_output(tiny, tmp_path, capsys):
    """QA round 4: a folder named in Latin-1 (`lat\\xe9in`) stopped the CSV writer at its first row (every re-run at
    the same place) and the HTML page after all the scoring. Such bytes are written as `\\xe9` in ids and names."""
    import os

    base = os.fsencode(str(tmp_path))
    folder = os.fsdecode(base + b"/lat\xe9in")
    os.mkdir(folder)
    tifffile.imwrite(os.path.join(folder, os.fsdecode(b"x\xff.tif")), np.random.default_rng(0).random((64, 64),
                                                                                                    dtype=np.float32))
    out, html = tmp_path / "x.csv", tmp_path / "x.html"
    assert main(["predict", folder, "--model", str(tiny), "--score-only", "--file-names", "--out", str(out),
                 "--html", str(html)]) == 0
    import csv

    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 1 and rows[0]["series"].endswith("lat\\xe9in") and rows[0]["file"] == "x\\xff.tif"
    assert "lat\\xe9in" in html.read_text(encoding="utf-8")
    # QA round 5: two names that differ only in such bytes were merged into one series (both "lat\ufffdin")
    other = os.fsdecode(base + b"/lat\xe8in")
    os.mkdir(other)
    tifffile.imwrite(os.path.join(other, "y.tif"), np.random.default_rng(1).random((64, 64), dtype=np.float32))
    out2 = tmp_path / "two.jsonl"
    assert main(["predict", folder, other, "--model", str(tiny), "--score-only", "--out", str(out2)]) == 0
    summary = [json.loads(line) for line in (tmp_path / "two.series.jsonl").read_text().splitlines()]
    assert [s["n_slices"] for s in summary] == [1, 1] and len({s["series"] for s in summary}) == 2
    assert main(["findings", "/dev/null"]) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_its_own_outputs_inside_an_input_folder_are_not_skipped_slices(tiny, tmp_path, capsys):
    """QA round 4: `predict DIR --html DIR/rep.html` run twice listed rep.html as an unreadable slice of DIR."""
    folder = _series(tmp_path / "series", n=2)
    args = ["predict", str(folder), "--model", str(tiny), "--score-only", "--out", str(folder / "x.jsonl"),
            "--html", str(folder / "rep.html")]
    assert main(args) == 0
    first = (folder / "x.series.jsonl").read_text()
    assert main(args) == 0
    assert (folder / "x.series.jsonl").read_text() == first  # the corrupt slice_999 only, both times
    assert json.loads(first)["n_skipped"] == 1
