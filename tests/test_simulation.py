"""Tests of ctiqa.simulation on the real CT that pydicom / pydicom-data ship.

Most tests use CT_small.dcm (128², always installed; its sinogram takes ~1 s). One test also projects the
512² abdomen (~12 s, once per test process) to check the held-out base slice and the LDCTIQA reader's
base-slice split.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tifffile
from scipy.stats import spearmanr
from skimage.transform import iradon, radon

from ctiqa import CTIQAError, simulation
from ctiqa.imaging import hu_to_unit, read_ct
from ctiqa.ldctiqa import load_ldctiqa, split_ids
from ctiqa.simulation import (
    BASE_SLICES,
    FULL_DOSE_NOISE_HU,
    N_FULL_VIEWS,
    degrade,
    expected_noise_hu,
    fbp,
    full_view_angles,
    level_for_score,
    project_base_slice,
    simulate,
    soft_tissue_mask,
    synthetic_score,
    view_indices,
)

CHEST = next(bs for bs in BASE_SLICES if bs.filename == "CT_small.dcm")


@pytest.fixture(scope="module")
def chest():
    path = simulation.base_slice_path(CHEST)
    assert path is not None, "CT_small.dcm ships with pydicom"
    return project_base_slice(CHEST, path)


def _sim(out, **kw):
    kw.setdefault("progress", False)
    return simulate(out, **kw)


# --- physics ------------------------------------------------------------------------------------------------


def test_fbp_matches_skimage_iradon_on_grid_and_at_chosen_pixels():
    rng = np.random.default_rng(1)
    img = rng.random((70, 70))
    theta = np.arange(90) * 2.0
    sino = radon(img, theta, circle=False, preserve_range=True)
    ref = iradon(sino, theta, circle=False, output_size=70, filter_name="ramp")
    np.testing.assert_allclose(fbp(sino, theta, 1.0, 70), ref, atol=1e-12)
    rows, cols = np.mgrid[5:30, 40:66]
    np.testing.assert_allclose(fbp(sino * 0.7, theta, 0.7, 70, pixels=(rows, cols)), ref[5:30, 40:66], atol=1e-12)


def test_reference_reconstruction_reproduces_the_slice(chest):
    hu = chest.hu.astype(np.float64)
    ref_hu = (chest.reference / simulation.MU_WATER_PER_MM - 1.0) * 1000.0
    inner = np.s_[8:-8, 8:-8]
    assert np.corrcoef(ref_hu[inner].ravel(), hu[inner].ravel())[0, 1] > 0.98  # aligned, same anatomy
    assert abs(np.median(ref_hu[inner] - hu[inner])) < 5.0  # HU scale kept (mu of water, pixel spacing)


def test_full_dose_noise_is_calibrated_and_grows_as_dose_falls(chest):
    mask = soft_tissue_mask(chest.hu)
    stds = []
    for dose in (1.0, 0.5, 0.25, 0.1):
        added = degrade(chest, dose, N_FULL_VIEWS, np.random.default_rng(7))
        stds.append(float(added[mask].std()))
    assert stds == sorted(stds) and len(set(stds)) == 4
    assert stds[0] == pytest.approx(FULL_DOSE_NOISE_HU, rel=0.1)
    for dose, s in zip((1.0, 0.5, 0.25, 0.1), stds, strict=True):
        assert s == pytest.approx(expected_noise_hu(dose, N_FULL_VIEWS), rel=0.12)


def test_streaks_grow_as_views_fall(chest):
    # noiseless sparse-view recon minus the full-view reference = streaks only
    mask = soft_tissue_mask(chest.hu)
    streak = []
    for views in (1024, 512, 256, 128, 64):
        idx = view_indices(views)
        rec = chest.recon(chest.sinogram[:, idx], full_view_angles()[idx])
        streak.append(float(simulation.mu_to_hu_difference(rec - chest.reference)[mask].std()))
    assert streak[0] < 1e-9
    assert all(a < b for a, b in zip(streak, streak[1:], strict=False))
    assert streak[-1] > 10.0


def test_cropped_field_of_view_gets_a_tapered_margin(chest):
    hu = chest.hu
    mu, m = simulation.attenuation_map(hu)  # CT_small: tissue along the border
    assert m == hu.shape[0] // simulation.TRUNCATION_MARGIN_DIVISOR and mu.shape == (hu.shape[0] + 2 * m,) * 2
    np.testing.assert_allclose(mu[m:-m, m:-m], simulation.hu_to_mu(hu))  # the slice itself is untouched
    assert np.all(mu[0] == 0) and np.all(mu[:, -1] == 0)  # faded to air at the outer edge
    assert chest.margin == m
    body = np.full((64, 64), -1000.0)
    body[16:48, 16:48] = 40.0  # whole body inside the image: no margin
    assert simulation.attenuation_map(body)[1] == 0


def test_view_indices_are_evenly_spread():
    idx = view_indices(100)
    assert len(idx) == len(set(idx)) == 100 and idx[0] == 0 and idx[-1] < N_FULL_VIEWS
    assert set(np.diff(idx)) <= {10, 11}
    with pytest.raises(ValueError):
        view_indices(0)


# --- scores ---------------------------------------------------------------------------------------------------


def test_score_endpoints_monotone_and_continuous():
    assert synthetic_score(1.0, 1024) == pytest.approx(4.0)
    assert synthetic_score(0.1, 64) == pytest.approx(0.0, abs=1e-12)
    doses = np.geomspace(0.1, 1.0, 12)
    views = np.unique(np.geomspace(64, 1024, 12).round().astype(int))
    grid = np.array([[synthetic_score(d, v) for v in views] for d in doses])
    assert (np.diff(grid, axis=0) > 0).all() and (np.diff(grid, axis=1) > 0).all()  # strictly monotone
    assert len(np.unique(np.round(grid, 1))) > 25  # continuous, not 5 levels
    with pytest.raises(ValueError):
        synthetic_score(0.0, 100)


def test_level_for_score_hits_the_target_inside_the_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        target, split = 4 * rng.random(), rng.random()
        dose, views = level_for_score(target, split)
        assert 0.1 <= dose <= 1.0 and 64 <= views <= 1024 and isinstance(views, int)
        assert synthetic_score(dose, views) == pytest.approx(target, abs=0.05)


# --- the dataset ----------------------------------------------------------------------------------------------


def test_simulate_chest_crops_layout_scores_and_synthetic_marking(tmp_path):
    out = tmp_path / "sim"
    deg = _sim(out, n_images=8, size=128, seed=3, base_slices=["chest"], test_base_slices=[])
    ds = load_ldctiqa(out)
    assert ds.synthetic is True and len(ds.ids) == 8 and ds.shape == (128, 128)
    labels = json.loads((out / "train.json").read_text())
    assert set(labels) == {f"{i:04d}.tif" for i in range(8)}
    assert all(labels[k] == v["score"] for k, v in deg["images"].items())
    assert deg["synthetic"] is True and "not radiologist ratings" in deg["note"]
    assert "SYNTHETIC" in (out / "README.txt").read_text()
    assert all(r["synthetic"] is True for r in deg["images"].values())
    scores = [r["score"] for r in deg["images"].values()]
    assert all(0.0 <= s <= 4.0 for s in scores) and len(set(scores)) >= 6  # one level per image here
    # monotone: lower score <-> more added HU (measured in the images)
    rho = spearmanr(scores, [r["added_noise_hu"] for r in deg["images"].values()]).statistic
    assert rho < -0.8
    hu = read_ct(simulation.base_slice_path(CHEST)).pixels
    for name, r in deg["images"].items():
        img = tifffile.imread(out / "image" / name)
        assert img.dtype == np.float32 and img.shape == (128, 128) and 0.0 <= img.min() and img.max() <= 1.0
        assert r["crop"] == [0, 0, 128]  # the slice is exactly --size: used whole
        # anatomy kept: the image is the windowed original plus noise
        assert np.corrcoef(img.ravel(), hu_to_unit(hu).ravel())[0, 1] > (0.9 if r["score"] > 2 else 0.5)
        assert r["noise_sigma_hu"] == pytest.approx(expected_noise_hu(r["dose_fraction"], r["n_views"]), abs=0.01)


def test_crops_are_native_resolution_tissue_and_deterministic(tmp_path):
    kw = dict(n_images=6, size=48, base_slices=["chest"], test_base_slices=[])
    a = _sim(tmp_path / "a", seed=5, **kw)
    b = _sim(tmp_path / "b", seed=5, workers=2, **kw)  # worker count changes nothing
    c = _sim(tmp_path / "c", seed=6, **kw)
    assert a["images"] == b["images"]
    for name in a["images"]:
        assert (tmp_path / "a" / "image" / name).read_bytes() == (tmp_path / "b" / "image" / name).read_bytes()
    assert a["images"] != c["images"]
    hu = read_ct(simulation.base_slice_path(CHEST)).pixels
    per_level: dict[int, list] = {}
    for name, r in a["images"].items():
        y, x, s = r["crop"]
        assert s == 48 and 0 <= y <= 128 - 48 and 0 <= x <= 128 - 48
        assert soft_tissue_mask(hu[y:y + s, x:x + s]).mean() >= simulation.MIN_TISSUE_FRACTION
        img = tifffile.imread(tmp_path / "a" / "image" / name)
        assert np.corrcoef(img.ravel(), hu_to_unit(hu[y:y + s, x:x + s]).ravel())[0, 1] > 0.5
        per_level.setdefault(r["level"], []).append(r)
    # several crops of one reconstruction share its (dose, views, score)
    assert any(len(v) > 1 for v in per_level.values())
    for recs in per_level.values():
        assert len({(r["dose_fraction"], r["n_views"], r["score"]) for r in recs}) == 1


def test_held_out_base_slice_loads_and_splits_like_ldctiqa(tmp_path):
    out = tmp_path / "sim"
    deg = _sim(out, n_images=10, size=64, seed=0, base_slices=["chest", "abdomen"])
    assert deg["test_base_slices"] == ["abdomen"]
    assert deg["base_slices"]["abdomen"]["held_out"] is True
    ds = load_ldctiqa(out)
    assert ds.test_base_slices == ["abdomen"]
    split = split_ids(ds, "base-slice", seed=0)
    test_bases = {ds.metadata[i]["base_slice"] for i in split["test"]}
    train_bases = {ds.metadata[i]["base_slice"] for i in split["train"] + split["validation"]}
    assert test_bases == {"abdomen"} and train_bases == {"chest"} and len(split["test"]) == 5
    # the abdomen is calibrated to the same full-dose noise as the small chest crop
    i0 = deg["base_slices"]["abdomen"]["i0_full_dose"]
    assert 1e6 < i0 < 1e7  # design.md: I0 ~3e6 gives ~9 HU on this slice
    assert deg["base_slices"]["abdomen"]["noise_hu_at_i0_3e6"] == pytest.approx(9.0, abs=1.0)


def test_rerun_replaces_previous_output_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "sim"
    _sim(out, n_images=5, size=64, base_slices=["chest"], test_base_slices=[])
    (out / "degradations.json").unlink()  # as if interrupted before the end: still ours, re-run replaces it
    _sim(out, n_images=3, size=64, base_slices=["chest"], test_base_slices=[])
    assert sorted(p.name for p in (out / "image").iterdir()) == ["0000.tif", "0001.tif", "0002.tif"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CTIQAError, match="not a ctiqa simulation"):
        _sim(foreign, n_images=2, size=64, base_slices=["chest"], test_base_slices=[])
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(n_images=0), "n-images"),
        (dict(size=8), "size"),
        (dict(size=1024), "no base slice is usable"),
        (dict(base_slices=["liver"]), "unknown base slice"),
        (dict(base_slices=["chest"], test_base_slices=["chest"]), "held out"),
        (dict(base_slices=["chest"], test_base_slices=["kidney"]), "unknown test base slice"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kw, match):
    kw = {"n_images": 2, "size": 64, **kw}
    with pytest.raises(CTIQAError, match=match):
        _sim(tmp_path / "x", **kw)


def test_missing_pydicom_data_falls_back_to_ct_small(monkeypatch):
    real = simulation.base_slice_path
    monkeypatch.setattr(simulation, "base_slice_path", lambda bs: real(bs) if bs.filename == "CT_small.dcm" else None)
    usable, skipped = simulation.resolve_base_slices(None, 64)
    assert [BASE_SLICES[i].name for i in usable] == ["chest"]
    assert len(skipped) == len(BASE_SLICES) - 1 and all("pydicom-data" in s for s in skipped)


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    path = simulation.base_slice_path(CHEST)
    monkeypatch.setattr(simulation, "_MEMORY_CACHE", {})
    a = project_base_slice(CHEST, path, tmp_path)
    assert len(list(tmp_path.glob("chest-*.npz"))) == 1
    monkeypatch.setattr(simulation, "_MEMORY_CACHE", {})
    b = project_base_slice(CHEST, path, tmp_path)
    np.testing.assert_array_equal(a.sinogram, b.sinogram)
    np.testing.assert_array_equal(a.reference, b.reference)
    assert a.i0 == b.i0 and math.isfinite(a.i0)


def test_cli_simulate(tmp_path, capsys):
    from ctiqa.cli import main

    out = tmp_path / "cli"
    rc = main(["simulate", "--out", str(out), "--n-images", "3", "--size", "64", "--base-slices", "chest",
               "--test-base-slices", "--workers", "1", "--no-cache"])
    assert rc == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert len(load_ldctiqa(out).ids) == 3
    rc = main(["simulate", "--out", str(tmp_path / "y"), "--size", "4096", "--no-cache"])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused_and_overwrite_moves_it_aside(tmp_path, capsys):
    """QA round 4: `ctiqa simulate --out SIM` over a simulation made with other settings replaced it silently.
    The same settings re-run (same images); other settings are refused naming each difference, nothing changed;
    --overwrite moves the previous files aside (.bak), never deletes them."""
    from ctiqa.cli import main

    out = tmp_path / "sim"
    argv = ["simulate", "--out", str(out), "--n-images", "3", "--size", "64", "--base-slices", "chest",
            "--test-base-slices", "--workers", "1", "--no-cache"]
    assert main(argv) == 0
    kept = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert json.loads((out / "degradations.json").read_text())["n_images"] == 3
    assert main(argv) == 0  # the same settings: written again, the same bytes
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    capsys.readouterr()
    assert main([*argv, "--n-images", "2", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(out) in err
    assert "--n-images 3 then, 2 now" in err and "--seed 0 then, 7 now" in err and "--size" not in err
    assert "--overwrite" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert main([*argv, "--n-images", "2", "--seed", "7", "--overwrite"]) == 0
    assert "moved the previous simulation" in capsys.readouterr().err
    assert len(load_ldctiqa(out).ids) == 2
    backups = sorted(p.name.split(".")[0] for p in out.glob("*.bak*"))
    assert backups == ["README", "degradations", "image", "train"]
    old = next(out.glob("image.*.bak"))
    assert {f.name: f.read_bytes() for f in old.iterdir()} == {
        k.name: v for k, v in kept.items() if k.parts[0] == "image"}


def test_a_cache_dir_that_is_a_file_is_refused_before_the_projections(tmp_path, capsys):
    """QA round 4: `simulate --cache-dir FILE` failed after a minute of sinogram work ("File exists")."""
    from ctiqa.cli import main

    mine = tmp_path / "mine.txt"
    mine.write_text("notes")
    assert main(["simulate", "--out", str(tmp_path / "sim"), "--size", "64", "--cache-dir", str(mine)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert mine.read_text() == "notes" and not (tmp_path / "sim").exists()


def test_an_interrupted_simulation_is_named_as_such(tmp_path, capsys):
    """QA round 4: `simulate` killed part-way, then `validate` / `build-dataset` on it said "no labels file ...
    pass labels= or use unlabelled mode" (Python wording); it now says the simulation was interrupted."""
    from ctiqa.cli import main
    from ctiqa.ldctiqa import SIMULATION_MARKER

    out = tmp_path / "sim"
    (out / "image").mkdir(parents=True)
    (out / SIMULATION_MARKER).write_text("written by ctiqa.simulation\n")
    (out / "image" / "0000.tif").write_bytes(b"")
    for argv in (["validate", str(out)], ["build-dataset", "--ldctiqa", str(out), "--out", str(tmp_path / "d")]):
        assert main(argv) == 2
        assert "an interrupted `ctiqa simulate`" in capsys.readouterr().err
