"""LDCTIQA reader: layouts, every validation error (naming the file), splits, ``ctiqa validate``."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ctiqa import CTIQAError
from ctiqa.cli import main
from ctiqa.ldctiqa import LDCTIQASet, load_ldctiqa, paper_split, resolve_split_method, split_ids, validate

N = 12


def scores_for(n=N):
    # multiples of 0.2 spread over 0..4, like LDCTIQA's mean of 5 ratings
    return {f"{i:04d}": round(round(i / (n - 1) * 4 / 0.2) * 0.2, 1) for i in range(n)}


def make_set(folder, n=N, size=32, *, image_dir="image", suffix=".tif", labels="train.json", seed=0):
    """Write a small LDCTIQA-layout folder: float32 [0, 1] TIFFs + labels JSON."""
    rng = np.random.default_rng(seed)
    (folder / image_dir).mkdir(parents=True)
    scores = scores_for(n)
    for i in scores:
        tifffile.imwrite(folder / image_dir / f"{i}{suffix}", rng.random((size, size), dtype=np.float32))
    if labels:
        (folder / labels).write_text(json.dumps({f"{i}{suffix}": s for i, s in scores.items()}))
    return folder


def write_labels(folder, mapping, name="train.json"):
    (folder / name).write_text(json.dumps(mapping))


# ---------------------------------------------------------------------------------------------- layouts


def test_training_layout_and_parent(tmp_path):
    root = make_set(tmp_path / "LDCTIQAG2023_train")
    for where in (root, tmp_path):  # the set itself, or the folder holding LDCTIQAG2023_train/
        ds = load_ldctiqa(where)
        assert ds.root == root and ds.ids == sorted(scores_for()) and len(ds) == N
        assert ds.scores == scores_for() and ds.labelled and ds.shape == (32, 32)
        assert ds.image_path("0003") == root / "image" / "0003.tif"
        assert ds.metadata == {} and ds.synthetic is False
        img = ds.read("0003")
        assert img.kind == "unit" and img.shape == (32, 32)
    with pytest.raises(CTIQAError, match="no image with id"):
        ds.image_path("9999")


def test_test_release_layout(tmp_path):
    root = make_set(tmp_path / "LDCTIQAC_test", image_dir="images", suffix=".tiff", labels="test.json")
    ds = load_ldctiqa(tmp_path)
    assert ds.root == root and ds.labels_file.name == "test.json" and len(ds) == N
    assert ds.image_path("0000").name == "0000.tiff"


def test_explicit_labels_and_unlabelled(tmp_path):
    root = make_set(tmp_path / "set", labels=None)
    with pytest.raises(CTIQAError, match="no labels file"):
        load_ldctiqa(root)
    unlabelled = load_ldctiqa(root, require_labels=False)
    assert unlabelled.scores == {} and not unlabelled.labelled and len(unlabelled) == N
    flat = load_ldctiqa(root / "image", require_labels=False)  # a bare folder of .tif files
    assert flat.ids == unlabelled.ids
    write_labels(tmp_path, {i: s for i, s in scores_for().items()}, name="my_scores.json")  # stems as keys
    ds = load_ldctiqa(root, labels=tmp_path / "my_scores.json")
    assert ds.scores == scores_for()


def test_parent_with_two_sets_is_ambiguous(tmp_path):
    make_set(tmp_path / "LDCTIQAG2023_train")
    make_set(tmp_path / "LDCTIQAC_test", image_dir="images", labels="test.json")
    with pytest.raises(CTIQAError, match="several LDCTIQA sets"):
        load_ldctiqa(tmp_path)


def test_degradations_metadata(tmp_path):
    root = make_set(tmp_path / "sim")
    images = {f"{i}.tif": {"base_slice": f"b{int(i) % 3}", "dose_fraction": 0.5, "n_views": 256} for i in scores_for()}
    (root / "degradations.json").write_text(json.dumps(
        {"synthetic": True, "note": "simulated", "test_base_slices": ["b0"], "images": images}))
    ds = load_ldctiqa(root)
    assert ds.synthetic and ds.test_base_slices == ["b0"]
    assert ds.metadata["0004"] == {"base_slice": "b1", "dose_fraction": 0.5, "n_views": 256}
    sp = split_ids(ds, "base-slice", seed=0)
    assert sp["test"] == [i for i in ds.ids if int(i) % 3 == 0]
    assert not set(sp["train"]) & set(sp["validation"]) and len(sp["validation"]) >= 1
    assert sorted(sp["train"] + sp["validation"] + sp["test"]) == ds.ids
    images["9999.tif"] = {"base_slice": "b0"}
    (root / "degradations.json").write_text(json.dumps({"synthetic": True, "images": images}))
    with pytest.raises(CTIQAError, match=r"degradations\.json.*9999"):
        load_ldctiqa(root)


def test_validate_counts_images_adjusted_on_reading(tmp_path, capsys):
    root = make_set(tmp_path / "s")
    x = np.linspace(-0.1, 1.1, 32 * 32, dtype=np.float32).reshape(32, 32)  # a denoiser's overshoot
    tifffile.imwrite(root / "image" / "0003.tif", x)
    rep = validate(load_ldctiqa(root))
    assert list(rep.notes) == ["0003"] and "clipped" in rep.notes["0003"][0] and rep.kind == "unit"
    assert main(["validate", str(root)]) == 0
    cap = capsys.readouterr()
    assert "adjusted on reading: 1 image(s)" in cap.out and "warning" not in cap.err  # one summary, not N lines


def test_duplicate_label_key_is_an_error_naming_it(tmp_path):
    root = make_set(tmp_path / "s")
    body = ", ".join(f'"{i}.tif": {s}' for i, s in scores_for().items())
    (root / "train.json").write_text("{" + body + ', "0004.tif": 0.4}')  # 0004 twice: json.load keeps the last
    with pytest.raises(CTIQAError, match=r"train\.json: key '0004\.tif' appears twice"):
        load_ldctiqa(root)
    (root / "degradations.json").write_text('{"synthetic": true, "images": {}, "images": {}}')
    write_labels(root, {f"{i}.tif": s for i, s in scores_for().items()})
    with pytest.raises(CTIQAError, match=r"degradations\.json: key 'images' appears twice"):
        load_ldctiqa(root)


def test_labels_with_utf8_bom_are_read(tmp_path):
    root = make_set(tmp_path / "s")
    text = json.dumps({f"{i}.tif": s for i, s in scores_for().items()})
    (root / "train.json").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Windows Notepad saves it
    assert load_ldctiqa(root).scores == scores_for()


# ---------------------------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize("bad, match", [
    (4.2, "outside"), (-0.2, "outside"), ("2.8", "not a number"), (True, "not a number"), (None, "not a number"),
])
def test_bad_label_values(tmp_path, bad, match):
    root = make_set(tmp_path / "s")
    labels = {f"{i}.tif": s for i, s in scores_for().items()}
    labels["0005.tif"] = bad
    write_labels(root, labels)
    with pytest.raises(CTIQAError, match=rf"train\.json.*0005\.tif.*{match}"):
        load_ldctiqa(root)


def test_nan_label_and_malformed_json(tmp_path):
    root = make_set(tmp_path / "s")
    text = json.dumps({f"{i}.tif": s for i, s in scores_for().items()}).replace("2.2", "NaN")
    (root / "train.json").write_text(text)
    with pytest.raises(CTIQAError, match=r"train\.json.*not a finite number"):
        load_ldctiqa(root)
    (root / "train.json").write_text("[1, 2]")
    with pytest.raises(CTIQAError, match=r"train\.json.*JSON object"):
        load_ldctiqa(root)
    (root / "train.json").write_text("{not json")
    with pytest.raises(CTIQAError, match=r"train\.json.*unreadable"):
        load_ldctiqa(root)


def test_image_without_label_and_label_without_image(tmp_path):
    root = make_set(tmp_path / "s")
    labels = {f"{i}.tif": s for i, s in scores_for().items()}
    del labels["0007.tif"]
    write_labels(root, labels)
    with pytest.raises(CTIQAError, match=r"0007\.tif: image has no label"):
        load_ldctiqa(root)
    labels["0007.tif"] = 1.0
    labels["0042.tif"] = 1.0
    write_labels(root, labels)
    with pytest.raises(CTIQAError, match=r"train\.json: label for '0042' but there is no image"):
        load_ldctiqa(root)


def test_unreadable_multichannel_and_size_mismatch(tmp_path):
    root = make_set(tmp_path / "s")
    (root / "image" / "0003.tif").write_bytes(b"garbage")
    with pytest.raises(CTIQAError, match=r"0003\.tif: unreadable TIFF"):
        load_ldctiqa(root)
    tifffile.imwrite(root / "image" / "0003.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    with pytest.raises(CTIQAError, match=r"0003\.tif: not a single-channel 2-D"):
        load_ldctiqa(root)
    tifffile.imwrite(root / "image" / "0003.tif", np.zeros((2, 32, 32), np.float32), photometric="minisblack")
    with pytest.raises(CTIQAError, match=r"0003\.tif: holds 2 pages"):
        load_ldctiqa(root)
    tifffile.imwrite(root / "image" / "0003.tif", np.zeros((16, 32), np.float32))
    with pytest.raises(CTIQAError, match=r"0003\.tif: size 32x16 differs"):
        load_ldctiqa(root)


def test_validate_reads_pixels_and_flags_mixed_kinds(tmp_path):
    root = make_set(tmp_path / "s")
    rep = validate(load_ldctiqa(root))
    assert rep.n_images == N and rep.n_labelled == N and rep.kind == "unit" and rep.shape == (32, 32)
    assert 0 <= rep.value_min < 0.01 and 0.99 < rep.value_max <= 1
    assert sum(rep.score_counts.values()) == N and rep.score_min == 0 and rep.score_max == 4
    expected = {b: sum(1 for s in scores_for().values() if math.floor(s + 0.5) == b) for b in range(5)}
    assert rep.score_counts == expected
    tifffile.imwrite(root / "image" / "0009.tif", np.full((32, 32), 40.0, np.float32) + np.eye(32, dtype=np.float32) * 500)
    with pytest.raises(CTIQAError, match=r"0009\.tif.*'hu'"):
        validate(load_ldctiqa(root))


# ---------------------------------------------------------------------------------------------- splits


def _fake_set(ids, scores=None):
    return LDCTIQASet(root=Path("/nowhere"), ids=sorted(ids), scores=scores or {},
                      image_dir=Path("/nowhere/image"))


def test_paper_split():
    sp = paper_split()
    assert [len(sp[k]) for k in ("train", "validation", "test")] == [800, 100, 100]
    all_ids = sp["train"] + sp["validation"] + sp["test"]
    assert len(set(all_ids)) == 1000 and all_ids[0] != ""
    ds = _fake_set(all_ids)
    got = split_ids(ds, "paper")
    assert got == sp and all(v == sorted(v) for v in got.values())
    with pytest.raises(CTIQAError, match="missing"):
        split_ids(_fake_set(all_ids[1:]), "paper")
    with pytest.raises(CTIQAError, match="not in the paper split"):
        split_ids(_fake_set([*all_ids, "zzzz"]), "paper")


def test_stratified_split_deterministic_and_stratified():
    rng = np.random.default_rng(1)
    ids = [f"{i:04d}" for i in range(200)]
    scores = {i: round(float(rng.integers(0, 21)) * 0.2, 1) for i in ids}
    ds = _fake_set(ids, scores)
    a, b, c = split_ids(ds, "stratified", seed=0), split_ids(ds, "stratified", seed=0), split_ids(ds, "stratified", seed=1)
    assert a == b and a != c
    assert list(a) == ["train", "validation", "test"]
    assert [len(a[k]) for k in a] == [160, 20, 20]
    assert sorted(a["train"] + a["validation"] + a["test"]) == ids
    # every rounded-score stratum with >= 10 images appears in test in about its share
    for s in range(5):
        members = [i for i in ids if math.floor(scores[i] + 0.5) == s]
        in_test = sum(1 for i in a["test"] if i in members)
        assert abs(in_test - len(members) / 10) <= 1
    with pytest.raises(CTIQAError, match="needs a score"):
        split_ids(_fake_set(ids), "stratified")
    with pytest.raises(CTIQAError, match="unknown split"):
        split_ids(ds, "random")


def test_base_slice_needs_degradations(tmp_path):
    ds = load_ldctiqa(make_set(tmp_path / "s"))
    with pytest.raises(CTIQAError, match="test_base_slices"):
        split_ids(ds, "base-slice")


def _simulated(root, n=N):
    """make_set + a degradations.json as `ctiqa simulate` writes it (base slices b0..b2, b0 held out)."""
    make_set(root, n)
    images = {f"{i}.tif": {"base_slice": f"b{int(i) % 3}", "dose_fraction": 0.5, "n_views": 256}
              for i in scores_for(n)}
    (root / "degradations.json").write_text(json.dumps(
        {"synthetic": True, "test_base_slices": ["b0"], "images": images}))
    return root


def test_auto_split_resolves_per_kind_of_data(tmp_path):
    sim = load_ldctiqa(_simulated(tmp_path / "sim"))
    method, why = resolve_split_method(sim)
    assert method == "base-slice" and "simulate" in why and "b0" in why
    assert split_ids(sim, "auto") == split_ids(sim, "base-slice")
    paper = paper_split()
    all_ids = paper["train"] + paper["validation"] + paper["test"]
    full = _fake_set(all_ids, {i: 2.0 for i in all_ids})
    assert resolve_split_method(full)[0] == "paper" and split_ids(full, "auto") == paper
    subset = _fake_set(all_ids[:200], {i: 0.2 * (k % 21) for k, i in enumerate(all_ids[:200])})
    assert resolve_split_method(subset)[0] == "stratified"
    assert split_ids(subset, "auto", seed=3) == split_ids(subset, "stratified", seed=3)
    assert resolve_split_method(subset, "paper") == ("paper", "as asked")
    # QA round 11: simulated data with no held-out slice was called "neither ... nor simulated data"
    from dataclasses import replace as _replace

    method, why = resolve_split_method(_replace(sim, test_base_slices=[]))
    assert method == "stratified" and "simulated images with no held-out base slice" in why
    # QA round 9: a stratified split of simulated data was not said to give up the held-out anatomy
    method, why = resolve_split_method(sim, "stratified")
    assert method == "stratified" and "not held-out anatomy" in why and "b0" in why
    with pytest.raises(CTIQAError, match="unknown split"):
        resolve_split_method(subset, "random")


def test_build_dataset_default_split_on_simulated_data(tmp_path, capsys):
    """The README flow: `ctiqa simulate` output -> `ctiqa build-dataset` with no --split (was: paper, failing)."""
    sim = _simulated(tmp_path / "sim", n=30)
    out = tmp_path / "ds"
    assert main(["build-dataset", "--ldctiqa", str(sim), "--teacher", "template", "--format", "score-only",
                 "--out", str(out), "--no-progress"]) == 0
    assert "split: base-slice (auto: ctiqa simulate output" in capsys.readouterr().out
    from datasets import load_dataset

    test_ids = load_dataset(str(out), split="test")["id"]
    assert sorted(test_ids) == [i for i in sorted(scores_for(30)) if int(i) % 3 == 0]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_validate_ok(tmp_path, capsys):
    make_set(tmp_path / "LDCTIQAG2023_train")
    assert main(["validate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"images: {N} (32x32)" in out and "detected kind: unit" in out and "score histogram" in out


def test_cli_validate_malformed_one_line_error(tmp_path, capsys):
    root = make_set(tmp_path / "s")
    labels = {f"{i}.tif": s for i, s in scores_for().items()}
    labels["0002.tif"] = 7
    write_labels(root, labels)
    assert main(["validate", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.json" in err and "0002.tif" in err and "\n" not in err
