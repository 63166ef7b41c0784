"""The LDCTIQA 2023 data layer: read, validate and split the Low-dose CT Perceptual Image Quality Assessment data.

Dataset: Lee et al., "Low-dose computed tomography perceptual image quality assessment", Medical Image Analysis
99, 103343 (2025); data on Zenodo, DOI 10.5281/zenodo.7833096. 512×512 single-channel abdominal slices
(Mayo/AAPM routine-dose data, degraded by sparse views and reduced dose), soft-tissue windowed (W350/L40) and
scaled to [0, 1], float TIFF; label = mean of 5 radiologists' 0-4 ratings (0 bad … 4 excellent).

Layouts accepted by :func:`load_ldctiqa` (``root`` may be any of them):

* training release: ``<root>/image/0000.tif … 0999.tif`` + ``<root>/train.json`` (``{"0000.tif": 2.8, ...}``);
* the parent folder holding ``LDCTIQAG2023_train/`` (or exactly one other sub-folder in one of these layouts);
* the separate 300-image test release, as redistributed (e.g. rajpurkarlab/ReX-MLE's preparation script):
  ``<root>/images/*.tiff`` + ``<root>/test.json`` (same mapping, file name -> score), parent ``LDCTIQAC_test/``;
  the official test labels were not published with the training data: if your copy differs, pass
  ``labels=`` (any JSON object file name -> score) and/or ``image_dir=`` explicitly;
* an image folder without labels (``require_labels=False``, for prediction): ``root`` holding ``image/`` or
  ``images/``, or the ``.tif``/``.tiff`` files themselves;
* ctiqa's simulated mini-LDCTIQA (:mod:`ctiqa.simulation`): the training layout plus ``degradations.json``
  (``{"synthetic": true, "test_base_slices": [...], "images": {"0000.tif": {...}}}``) -> :attr:`metadata`,
  :attr:`synthetic`.

Labels file keys are matched to images by file stem (``"0007.tif"`` and ``"0007"`` both name id ``"0007"``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ctiqa import CTIQAError
from ctiqa.scale import SCORE_MAX, SCORE_MIN

#: Score range of LDCTIQA labels (ctiqa.scale).
SCORE_RANGE: tuple[float, float] = (SCORE_MIN, SCORE_MAX)
LABEL_FILES: tuple[str, ...] = ("train.json", "test.json", "labels.json")
IMAGE_DIRS: tuple[str, ...] = ("image", "images")
RELEASE_DIRS: tuple[str, ...] = ("LDCTIQAG2023_train", "LDCTIQAC_test")
TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
#: The held-out split: what ``ctiqa evaluate`` reports on (its default ``--split``); training never reads it, neither
#: to train on nor to select a checkpoint (:func:`ctiqa.training.check_splits`).
TEST_SPLIT = "test"
#: Dataset split names, in order (the Hub's conventional names; every split method returns all three).
SPLITS: tuple[str, ...] = ("train", "validation", TEST_SPLIT)
#: Split methods of :func:`split_ids` (the ONE home of these names; ``ctiqa build-dataset --split`` imports them).
#: ``"auto"`` picks one of the other three (:func:`resolve_split_method`).
SPLIT_METHODS: tuple[str, ...] = ("auto", "paper", "stratified", "base-slice")
DEGRADATIONS_FILE = "degradations.json"
#: Written first by ``ctiqa simulate`` into its output folder; without :data:`DEGRADATIONS_FILE` (written last) it
#: marks a simulation that was interrupted.
SIMULATION_MARKER = ".ctiqa-simulation"


@dataclass
class LDCTIQASet:
    """An LDCTIQA-layout image set.

    Attributes:
        root: the folder that holds the image folder and labels.
        ids: sorted image ids (file stems, e.g. ``"0007"``).
        scores: id -> true score (float, 0-4); empty for an unlabelled (prediction-only) set.
        image_dir: the folder of the TIFF images.
        labels_file: the labels JSON, or ``None``.
        metadata: id -> dict from ``degradations.json`` (simulated data), else ``{}``.
        synthetic: True when ``degradations.json`` marks the set synthetic (simulated scores, not radiologists').
        test_base_slices: base slices held out for the test split (``degradations.json``), else ``[]``.
        shape: (H, W) of every image, from the TIFF headers.
    """

    root: Path
    ids: list[str]
    scores: dict[str, float]
    image_dir: Path
    labels_file: Path | None = None
    metadata: dict[str, dict] = field(default_factory=dict)
    synthetic: bool = False
    test_base_slices: list[str] = field(default_factory=list)
    shape: tuple[int, int] | None = None
    files: dict[str, Path] = field(default_factory=dict, repr=False)

    def image_path(self, id: str) -> Path:
        """Path of image ``id`` (KeyError-free: raises CTIQAError naming the set for an unknown id)."""
        try:
            return self.files[id]
        except KeyError:
            raise CTIQAError(f"{self.image_dir}: no image with id {id!r}") from None

    def read(self, id: str):
        """The image as a :class:`ctiqa.imaging.CTImage` (via :func:`ctiqa.imaging.read_ct`)."""
        from ctiqa.imaging import read_ct

        return read_ct(self.image_path(id))

    @property
    def labelled(self) -> bool:
        """True when every image has a score."""
        return bool(self.scores) and len(self.scores) == len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _has_layout(d: Path) -> bool:
    return any((d / name).is_dir() for name in IMAGE_DIRS)


def _resolve_root(root: Path) -> Path:
    """Descend from a parent folder (e.g. the one holding ``LDCTIQAG2023_train/``) to the set itself."""
    if _has_layout(root):
        return root
    candidates = [root / n for n in RELEASE_DIRS if (root / n).is_dir() and _has_layout(root / n)]
    if not candidates:
        candidates = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _has_layout(d))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise CTIQAError(f"{root}: holds several LDCTIQA sets ({names}); point at one of them")
    return root  # maybe the image folder itself


def _given_path(root: Path, given: str | os.PathLike, exists: Callable[[Path], bool], what: str) -> Path:
    """A path the caller named: as given when absolute or ``exists(path)``, else relative to ``root``.

    Raises:
        CTIQAError: neither exists (``what`` names it: "image folder", "labels file").
    """
    p = Path(given)
    p = p if p.is_absolute() or exists(p) else root / p
    if not exists(p):
        raise CTIQAError(f"{p}: {what} not found")
    return p


def _find_image_dir(root: Path, image_dir: str | os.PathLike | None) -> Path:
    if image_dir is not None:
        return _given_path(root, image_dir, Path.is_dir, "image folder")
    found = [root / n for n in IMAGE_DIRS if (root / n).is_dir()]
    if len(found) > 1:
        raise CTIQAError(f"{root}: has both image/ and images/; pass image_dir= to choose one")
    if found:
        return found[0]
    if any(p.suffix.lower() in TIFF_SUFFIXES for p in root.iterdir()):
        return root
    raise CTIQAError(
        f"{root}: no LDCTIQA images: expected {root}/image/*.tif (training release), {root}/images/*.tiff "
        f"(test release), a parent of {RELEASE_DIRS[0]}/, or a folder of .tif files"
    )


def _find_labels(root: Path, labels: str | os.PathLike | None) -> Path | None:
    if labels is not None:
        return _given_path(root, labels, Path.is_file, "labels file")
    found = [root / n for n in LABEL_FILES if (root / n).is_file()]
    if len(found) > 1:
        raise CTIQAError(f"{root}: several labels files ({', '.join(f.name for f in found)}); pass labels= to choose")
    return found[0] if found else None


def _check_score(value: Any, key: str, labels_file: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CTIQAError(f"{labels_file}: label of {key!r} is not a number: {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise CTIQAError(f"{labels_file}: label of {key!r} is not a finite number: {value!r}")
    if not SCORE_RANGE[0] <= v <= SCORE_RANGE[1]:
        raise CTIQAError(f"{labels_file}: label of {key!r} is {v!r}, outside [{SCORE_RANGE[0]:g}, {SCORE_RANGE[1]:g}]")
    return v


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """``json`` object hook: a key given twice in one object is an error (``json`` itself keeps the last)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _load_json_object(path: Path, what: str) -> dict:
    """Read a JSON object file: UTF-8 with or without a byte-order mark; a key twice in one object is an error
    naming the key; NaN/Infinity parse to floats (the callers reject them with the key)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # utf-8-sig: a leading BOM (Windows editors) is dropped
            data = json.load(f, parse_constant=lambda c: float(c), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CTIQAError(f"{path}: key {e.args[0]!r} appears twice in one object (JSON readers keep only the "
                         "last value, silently): remove one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CTIQAError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CTIQAError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _read_scores(labels_file: Path) -> dict[str, float]:
    data = _load_json_object(labels_file, "labels file (JSON object: image file name -> score 0-4)")
    scores: dict[str, float] = {}
    for key, value in data.items():
        stem = Path(key).stem if Path(key).suffix.lower() in TIFF_SUFFIXES else key
        if stem in scores:
            raise CTIQAError(f"{labels_file}: two labels for image {stem!r}")
        scores[stem] = _check_score(value, key, labels_file)
    return scores


def _list_images(image_dir: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in TIFF_SUFFIXES:
            continue
        if p.stem in files:
            raise CTIQAError(f"{p}: duplicate image id {p.stem!r} (also {files[p.stem].name})")
        files[p.stem] = p
    if not files:
        raise CTIQAError(f"{image_dir}: no .tif/.tiff images")
    return files


def _header_shape(path: Path) -> tuple[int, ...]:
    """(H, W) of a single-page, single-channel TIFF from its header (no pixel read)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            n_pages = len(tf.pages)
            page = tf.pages[0]
            shape = tuple(page.shape)
            samples = int(getattr(page, "samplesperpixel", 1))
    except Exception as e:
        raise CTIQAError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from e
    if n_pages != 1:
        raise CTIQAError(f"{path}: holds {n_pages} pages; LDCTIQA images are single 2-D slices")
    if samples != 1 or len(shape) != 2:
        raise CTIQAError(
            f"{path}: not a single-channel 2-D image (shape {shape}, {samples} samples per pixel)"
        )
    return shape


def _check_shapes(files: dict[str, Path]) -> tuple[int, int]:
    shapes = {i: _header_shape(p) for i, p in files.items()}
    common = Counter(shapes.values()).most_common(1)[0][0]
    for i, s in shapes.items():
        if s != common:
            raise CTIQAError(
                f"{files[i]}: size {s[1]}x{s[0]} differs from the other images in the set ({common[1]}x{common[0]})"
            )
    return common  # type: ignore[return-value]


def _read_degradations(path: Path, ids: set[str]) -> tuple[dict[str, dict], bool, list[str]]:
    data = _load_json_object(path, "degradations file")
    images = data.get("images", {})
    if not isinstance(images, dict):
        raise CTIQAError(f"{path}: 'images' must be a JSON object (file name -> degradation record)")
    meta: dict[str, dict] = {}
    for key, rec in images.items():
        stem = Path(key).stem if Path(key).suffix.lower() in TIFF_SUFFIXES else key
        if stem not in ids:
            raise CTIQAError(f"{path}: record for {key!r} but there is no such image")
        if not isinstance(rec, dict):
            raise CTIQAError(f"{path}: record for {key!r} must be a JSON object")
        meta[stem] = rec
    test_base = data.get("test_base_slices", [])
    if not isinstance(test_base, list):
        raise CTIQAError(f"{path}: 'test_base_slices' must be a list")
    return meta, bool(data.get("synthetic", True)), [str(t) for t in test_base]


def load_ldctiqa(
    root: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    require_labels: bool = True,
    check_images: bool = True,
) -> LDCTIQASet:
    """Load an LDCTIQA-layout folder (see the module docstring for the layouts) and check it.

    Checks (each failure raises :class:`ctiqa.CTIQAError` naming the file): labels file is a JSON object whose
    values are numbers in [0, 4] (not bool, NaN or strings); every image has a label and every label an image;
    with ``check_images`` every TIFF header is readable, one page, single-channel 2-D, and all sizes are equal
    (headers only: fast; :func:`validate` reads the pixels).

    Args:
        root: the set folder, or its parent (e.g. the folder holding ``LDCTIQAG2023_train/``).
        labels: explicit labels JSON (file name or stem -> score); default ``train.json``/``test.json``/
            ``labels.json`` in the set folder.
        image_dir: explicit image folder; default ``image/`` or ``images/`` (or ``root`` itself).
        require_labels: raise when no labels file is found (False: unlabelled set for prediction).
        check_images: read every TIFF header.

    Returns:
        :class:`LDCTIQASet`.
    """
    root = Path(root)
    if not root.is_dir():
        raise CTIQAError(f"{root}: not a folder")
    if image_dir is None:
        root = _resolve_root(root)
    img_dir = _find_image_dir(root, image_dir)
    files = _list_images(img_dir)
    labels_file = _find_labels(root, labels)
    scores: dict[str, float] = {}
    if labels_file is None:
        if require_labels and (root / SIMULATION_MARKER).is_file() and not (root / DEGRADATIONS_FILE).is_file():
            raise CTIQAError(f"{root}: an interrupted `ctiqa simulate` (no {DEGRADATIONS_FILE} yet): run the same "
                             "ctiqa simulate command again to finish it")
        if require_labels:
            raise CTIQAError(f"{root}: no labels file ({' / '.join(LABEL_FILES)}): is this an LDCTIQA folder? "
                             "(ctiqa validate: --labels FILE, or --no-labels to check an unlabelled folder; Python: labels= or "
                             "require_labels=False)")
    else:
        scores = _read_scores(labels_file)
        for i, p in files.items():
            if i not in scores:
                raise CTIQAError(f"{p}: image has no label in {labels_file}")
        for i in scores:
            if i not in files:
                raise CTIQAError(f"{labels_file}: label for {i!r} but there is no image {img_dir / (i + '.tif')}")
    shape = _check_shapes(files) if check_images else None
    meta: dict[str, dict] = {}
    synthetic, test_base = False, []
    deg = root / DEGRADATIONS_FILE
    if deg.is_file():
        meta, synthetic, test_base = _read_degradations(deg, set(files))
    ids = sorted(files)
    return LDCTIQASet(
        root=root, ids=ids, scores=scores, image_dir=img_dir, labels_file=labels_file, metadata=meta,
        synthetic=synthetic, test_base_slices=test_base, shape=shape, files=files,
    )


# --------------------------------------------------------------------------------------------------------------
# Full validation (pixels)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """What :func:`validate` found. Pixel values are in the units of ``kind`` (LDCTIQA: [0, 1])."""

    n_images: int
    n_labelled: int
    shape: tuple[int, int]
    kind: str
    value_min: float
    value_max: float
    score_counts: dict[int, int]  # rounded score (0-4) -> number of images
    score_min: float | None
    score_max: float | None
    score_mean: float | None
    synthetic: bool
    notes: dict[str, list[str]] = field(default_factory=dict)  # id -> what reading assumed/adjusted (CTImage.notes)


def validate(ds: LDCTIQASet) -> ValidationReport:
    """Read every image's pixels with :func:`ctiqa.imaging.read_ct` and summarise the set.

    What reading assumed or adjusted (e.g. overshoot of [0, 1] clipped) is collected in ``notes`` instead of one
    :class:`ctiqa.CTIQAWarning` per image.

    Raises:
        CTIQAError: an unreadable image, or images whose detected kinds differ (e.g. one HU image among [0, 1]
            LDCTIQA images), naming the file.
    """
    import warnings

    from ctiqa import CTIQAWarning
    from ctiqa.imaging import read_ct

    kinds: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    lo, hi = math.inf, -math.inf
    shape = ds.shape
    for i in ds.ids:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CTIQAWarning)
            img = read_ct(ds.image_path(i))
        if img.notes:
            notes[i] = img.notes
        if shape is None:
            shape = img.shape
        elif img.shape != shape:
            raise CTIQAError(f"{img.source}: size {img.shape[1]}x{img.shape[0]} differs from the set ({shape[1]}x{shape[0]})")
        kinds[i] = img.kind
        lo, hi = min(lo, float(img.pixels.min())), max(hi, float(img.pixels.max()))
    kind = Counter(kinds.values()).most_common(1)[0][0]
    for i, k in kinds.items():
        if k != kind:
            raise CTIQAError(f"{ds.image_path(i)}: pixel values read as {k!r}, the rest of the set as {kind!r}")
    s = np.array([ds.scores[i] for i in ds.ids if i in ds.scores], dtype=np.float64)
    counts = {b: 0 for b in range(5)}
    for v in s:
        counts[int(math.floor(v + 0.5))] += 1
    return ValidationReport(
        n_images=len(ds.ids), n_labelled=len(s), shape=tuple(shape), kind=kind, value_min=lo, value_max=hi,
        score_counts=counts,
        score_min=float(s.min()) if len(s) else None, score_max=float(s.max()) if len(s) else None,
        score_mean=float(s.mean()) if len(s) else None, synthetic=ds.synthetic, notes=notes,
    )


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------


def paper_split() -> dict[str, list[str]]:
    """The BVM 2026 paper's 800/100/100 partition of the 1,000 LDCTIQA training ids (shipped package data)."""
    text = resources.files("ctiqa").joinpath("data/ldctiqa_paper_split.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return {k: sorted(data[k]) for k in SPLITS}


def _stratum(score: float) -> int:
    return int(math.floor(score + 0.5))


def _stratified_cycle(ids: list[str], scores: dict[str, float], seed: int, slots: dict[int, str], default: str) -> dict[str, list[str]]:
    """Shuffle ids within each rounded-score stratum (seeded), lay the strata end to end and deal them over a
    cycle of 10 positions: position p % 10 in ``slots`` goes to that split, the rest to ``default``.
    Every stratum thus contributes ~10 % per slot, and the totals are exact for multiples of 10."""
    rng = np.random.default_rng(seed)
    ordered: list[str] = []
    for s in sorted({_stratum(scores[i]) for i in ids}):
        members = sorted(i for i in ids if _stratum(scores[i]) == s)
        ordered += [members[k] for k in rng.permutation(len(members))]
    out: dict[str, list[str]] = {name: [] for name in {*slots.values(), default}}
    for pos, i in enumerate(ordered):
        out[slots.get(pos % 10, default)].append(i)
    return {k: sorted(v) for k, v in out.items()}


def resolve_split_method(ds: LDCTIQASet, method: str = "auto") -> tuple[str, str]:
    """The split method ``"auto"`` stands for, and why; other names are returned as given.

    ``"auto"`` picks:

    * ``"base-slice"`` for ``ctiqa simulate`` output (``degradations.json`` lists ``test_base_slices``): the test
      split is a base slice never seen in training;
    * ``"paper"`` for the full LDCTIQA training release (exactly the 1,000 ids of the shipped paper split);
    * ``"stratified"`` otherwise (a subset, the test release, your own labelled folder).

    Returns:
        ``(method, reason)``: one of ``"paper" | "stratified" | "base-slice"``, and a short phrase for the output
        (e.g. ``"auto: ctiqa simulate output with held-out base slices"``; ``"as asked"`` for an explicit name).

    Raises:
        CTIQAError: unknown method name.
    """
    if method not in SPLIT_METHODS:
        raise CTIQAError(f"unknown split method {method!r}; choose one of {', '.join(SPLIT_METHODS)}")
    if method != "auto":
        if ds.test_base_slices and method != "base-slice":  # simulated crops share their base slice's anatomy
            return method, ("as asked; every split holds crops of every base slice, so the test split is not held-out "
                            f"anatomy (base-slice, the auto choice, holds out {', '.join(ds.test_base_slices)})")
        return method, "as asked"
    if ds.test_base_slices:
        return "base-slice", (f"auto: ctiqa simulate output, held-out base slice(s) "
                              f"{', '.join(ds.test_base_slices)} form the test split")
    if ds.synthetic:  # ctiqa simulate --test-base-slices with none held out
        return "stratified", (f"auto: {len(ds.ids)} simulated images with no held-out base slice: seeded 80/10/10 "
                              "stratified by score; train, validation and test share base slices (anatomy), so the "
                              "test split is not held-out anatomy")
    want = set().union(*paper_split().values())
    if set(ds.ids) == want:
        return "paper", "auto: the full LDCTIQA training release (the paper's 800/100/100 ids)"
    return "stratified", (f"auto: {len(ds.ids)} images that are neither the full LDCTIQA training release nor "
                          "simulated data: seeded 80/10/10 stratified by score")


def split_ids(ds: LDCTIQASet, method: str, seed: int = 0) -> dict[str, list[str]]:
    """Split the ids of ``ds`` into train / validation / test (sorted, disjoint, covering ``ds.ids``).

    Methods (:data:`SPLIT_METHODS`):
        ``"auto"``: whichever of the three below fits the data (:func:`resolve_split_method`).
        ``"paper"``: the shipped 800/100/100 partition of the BVM 2026 paper (``ctiqa/data/
        ldctiqa_paper_split.json``); ``ds`` must hold exactly those 1,000 ids.
        ``"stratified"``: seeded 80/10/10, stratified by score rounded to 0-4 (deterministic for a seed).
        ``"base-slice"``: simulated data: test = images whose ``base_slice`` (degradations.json) is listed in
        ``test_base_slices``; validation = seeded stratified 10 % of the rest; train = the rest.

    Raises:
        CTIQAError: unknown method; ids missing from / not in the paper split; unlabelled set for a stratified
            split; missing ``base_slice``/``test_base_slices`` for ``base-slice``.
    """
    method, _ = resolve_split_method(ds, method)
    if method == "paper":
        split = paper_split()
        have = set(ds.ids)
        want = set().union(*split.values())
        missing = sorted(want - have)
        if missing:
            raise CTIQAError(
                f"{ds.image_dir}: {len(missing)} ids of the paper split are missing (e.g. {', '.join(missing[:5])}); "
                "the paper split needs the full LDCTIQA training release"
            )
        extra = sorted(have - want)
        if extra:
            raise CTIQAError(
                f"{ds.image_dir}: {len(extra)} images are not in the paper split (e.g. {', '.join(extra[:5])}); "
                "use --split stratified"
            )
        return split
    if not ds.labelled:
        raise CTIQAError(f"{ds.root}: the {method} split needs a score for every image")
    if method == "stratified":
        parts = _stratified_cycle(ds.ids, ds.scores, seed, {0: "test", 1: "validation"}, "train")
        return {k: parts[k] for k in SPLITS}
    # base-slice
    deg = ds.root / DEGRADATIONS_FILE
    if not ds.test_base_slices:
        raise CTIQAError(f"{deg}: no 'test_base_slices' (the base-slice split is for simulated data)")
    held = set(ds.test_base_slices)
    test, rest = [], []
    for i in ds.ids:
        base = ds.metadata.get(i, {}).get("base_slice")
        if base is None:
            raise CTIQAError(f"{deg}: no base_slice for image {i!r}")
        (test if str(base) in held else rest).append(i)
    if not test:
        raise CTIQAError(f"{deg}: no image has a base slice listed in test_base_slices")
    if not rest:
        raise CTIQAError(f"{deg}: every image is in a test base slice; nothing left to train on")
    parts = _stratified_cycle(rest, ds.scores, seed, {0: "validation"}, "train")
    return {"train": parts["train"], "validation": parts.get("validation", []), "test": sorted(test)}


# --------------------------------------------------------------------------------------------------------------
# CLI: ctiqa validate DIR
# --------------------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ctiqa validate``."""
    parser.add_argument("dir", help="LDCTIQA folder (image/ + train.json), its parent, or a test-release folder")
    parser.add_argument("--labels", default=None, help="labels JSON (default: train.json / test.json in DIR)")
    parser.add_argument("--image-dir", default=None, help="image folder (default: DIR/image or DIR/images)")
    parser.add_argument("--no-labels", action="store_true", help="accept an unlabelled folder (prediction only)")


def format_report(ds: LDCTIQASet, rep: ValidationReport) -> str:
    """The human-readable summary printed by ``ctiqa validate``."""
    lines = [
        f"LDCTIQA set: {ds.root}" + ("  [SYNTHETIC: simulated scores, not radiologists']" if ds.synthetic else ""),
        f"  images: {rep.n_images} ({rep.shape[1]}x{rep.shape[0]})  labelled: {rep.n_labelled}"
        + (f"  labels: {ds.labels_file.name}" if ds.labels_file else ""),
        f"  pixel values: {rep.value_min:.6g} .. {rep.value_max:.6g}  detected kind: {rep.kind}"
        + ("  (soft-tissue window W350/L40 scaled to [0, 1], not HU)" if rep.kind == "unit" else ""),
    ]
    if rep.notes:
        first = next(iter(rep.notes.values()))[0]
        lines.append(f"  adjusted on reading: {len(rep.notes)} image(s), e.g. {first}")
    if rep.n_labelled:
        lines.append(f"  scores: min {rep.score_min:.2f}  mean {rep.score_mean:.2f}  max {rep.score_max:.2f}")
        lines.append("  score histogram (rounded score):")
        top = max(rep.score_counts.values()) or 1
        for b, c in rep.score_counts.items():
            lines.append(f"    {b}  {c:5d}  {'#' * round(40 * c / top)}")
    if ds.labelled:
        method, why = resolve_split_method(ds, "auto")
        lines.append(f"  split (build-dataset --split auto): {method} ({why.removeprefix('auto: ')})")
    if ds.test_base_slices:
        lines.append(f"  held-out base slices: {', '.join(ds.test_base_slices)}")
    return "\n".join(lines)


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa validate``: load + full pixel validation; prints the summary. Returns 0 (errors raise)."""
    ds = load_ldctiqa(args.dir, labels=args.labels, image_dir=args.image_dir, require_labels=not args.no_labels)
    print(format_report(ds, validate(ds)))
    return 0
