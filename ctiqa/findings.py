"""Measured findings: transparent measurements of what a rationale talks about (noise, streaks), no learned model.

``ctiqa findings INPUT... [--out FILE.jsonl]`` writes one JSON row per image (:meth:`Findings.to_row`):

``id``
    unique within a run (a later image with an id already given is ``ID~2``, ``ID~3``...): the file stem for
    TIFF/PNG/JPEG files and LDCTIQA folders (``0007`` for ``image/0007.tif``; ``stem#N`` for
    frame N of a multi-page file); never a DICOM file name (often a SOP Instance UID) unless ``--file-names``: a DICOM
    file given directly is ``dicom#K`` (the K-th such input; ``dicom#K/N`` for frame N), a slice of a DICOM series
    folder ``FOLDER/i`` (its position along the slice normal).
``noise_hu``
    quantum-noise standard deviation in HU (None when fewer than :data:`MIN_NOISE_WINDOWS` soft-tissue windows).
``noise_severity``
    ``none`` / ``mild`` / ``moderate`` / ``severe``: the bands of :mod:`ctiqa.vocabulary` (below 17 / 32 / 60 HU),
    shared with the simulated-truth rubric and the template teacher.
``streak_index``
    strength of sparse-view streaks (dimensionless, >= 0; see below).
``streaks``
    the present/absent call: ``streak_index >= STREAK_THRESHOLD``.
``soft_tissue_fraction``
    fraction of the image where noise was measured (a small one makes ``noise_hu`` less certain).

Pixels (the one pixel path, :mod:`ctiqa.imaging`): HU images are measured in HU; LDCTIQA's [0, 1] data and 8-bit
display images are the soft-tissue window W350/L40 (:data:`ctiqa.imaging.SOFT_TISSUE`), mapped back with
:func:`ctiqa.imaging.unit_to_hu` (``HU = -135 + 350·x``). Saturated pixels (0 or 1: outside the window) carry no
HU; they stay out of the soft-tissue mask (the streak measure keeps them: see "Streaks").

Noise (HU)
----------
1. Soft-tissue mask: pixels whose 7x7 local mean lies in -50..130 HU (fat, lung, air and bone edges out; within
   it a clipped noisy pixel keeps its rank, so the estimate stays valid to about 80 HU under the window).
2. The finest diagonal wavelet band (Haar HH: ``(a - b - c + d) / 2`` over 2x2 blocks; for white noise of std σ
   it has std σ) of the blocks inside the mask; its RMS over 4x4 coefficients (8x8 pixels) gives a local noise
   estimate per window.
3. ``noise_hu = NOISE_CALIBRATION x`` the 20th percentile of the local estimates: a low percentile keeps
   windows with edges and texture out; the constant combines the percentile of a chi distribution with 16
   degrees of freedom (about 0.82 for white noise) with the share of the ramp-filtered CT noise power in the
   finest band, calibrated on the simulator's training base slices (:data:`NOISE_CALIBRATION`). Other
   reconstruction kernels put another share of the noise there: on real scans the level is an estimate; the
   ranking holds.

Validation (``bench/bench_findings.py`` on a fresh ``ctiqa simulate``): see that script and the README.

Streaks
-------
Sparse-view streaks come from back-projecting few views: every view adds a pattern that is constant along its
own direction, and in the 2-D spectrum each view's contribution (its noise and its streaks) lies on one radial
line, a spoke at the view's angle. With n views over 180° the spectrum's energy therefore comes in n evenly spaced
spokes: the angular profile of the power spectrum is periodic with n periods per 180°. Isotropic noise, and
anatomy, have no such periodicity. The measure finds it:

HU images are first clipped to the soft-tissue window (:data:`ctiqa.imaging.SOFT_TISSUE`, -135..215 HU): the
domain :data:`STREAK_THRESHOLD` was calibrated in and what the model sees, so ``ctiqa findings`` on a DICOM and the
findings of ``ctiqa predict`` (measured on the rendered image) call the same slice alike.

1. ``V(θ)`` (:func:`streak_profile`): the high-pass residual (image minus a Gaussian blur of
   :data:`STREAK_HIGHPASS_PX` px: the finest scales, where spokes lie farthest apart and anatomy is weakest) of the
   central square (at most :data:`STREAK_MAX_SIZE` px), its power spectrum (zero-padded 2x) summed along the
   radial line at each of :data:`STREAK_ANGLES` angles over 180°, out to the spectrum's corners (the corners
   resolve the most views). By the Fourier slice theorem ``V(θ)`` is the variance of the residual's parallel
   projections at θ.
2. ``streak_index`` (:func:`streak_index`): the angular power spectrum ``P(h)`` of ``log V`` (h = periods per
   180°), and the largest ratio ``P(h) / median(P over h ± 24)`` for h in :data:`STREAK_HARMONICS`: a spike at
   the view count standing out of the local floor. The ratio is dimensionless and independent of the noise
   level: a periodic profile raises it, more noise of the same kind does not. Without periodicity it is the
   largest of ~230 chi-square ratios: about 9 (log 2.2), whatever the noise.

What it can see is bounded by the image's size (sampling theory: n views are exact within a disc of diameter
about 2n/π px at the pixel's Nyquist frequency, so in a D-px image spokes can be told apart only for n below about
π·D/2, π·D/√2 in the spectrum's corners): on 128-px crops, n_views up to about 200 are seen; 200-255 views are at
chance and the "mild" band (256-511) is mostly uncalled. Saturated pixels of a windowed image (LDCTIQA's [0, 1],
8-bit displays) are kept: clipping is a pointwise monotone map, so the orientation of the noise survives it, while
masking them takes much of a noisy image away (independent set, seed 1, 2-px high-pass: residual AUC 0.83 with
saturated pixels and a 2-px margin zeroed, 0.91 with only them zeroed, 0.92 kept); the straight edges of saturated
regions put single spikes in ``V``, which are broadband in ``P`` and absorbed by the local floor.

Validation (``python bench/bench_findings.py --independent 300``: a simulation whose n_views and noise σ are
drawn independently, Spearman 0.06; issue 11's bar is AUC >= 0.80 for n_views < 256 vs >= 512 on the residual
after a linear fit of the index on log true σ): see :data:`STREAK_CALL_VALIDATED`, the bench and the README for
the figures. On ``ctiqa simulate``'s own ladder (views and σ coupled, Spearman -0.90) that residual criterion
cannot be met by any index (an oracle -log n_views scores 0.64-0.75 there); the bench prints both.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ctiqa import CTIQAError
from ctiqa.imaging import (
    MEDGEMMA_3WINDOW,
    SOFT_TISSUE,
    CTImage,
    hu_to_unit,
    is_dicom_file,
    read_ct_frames,
    unit_to_hu,
)
from ctiqa.paths import atomic_write, check_output_path
from ctiqa.vocabulary import noise_severity

# ------------------------------------------------------------------------------------------------- constants
#: The channel of a "medgemma-3window" rendering that holds the soft-tissue window (W350/L40).
SOFT_TISSUE_CHANNEL = MEDGEMMA_3WINDOW.index(SOFT_TISSUE)
#: Soft-tissue mask: local mean (HU) over TISSUE_WINDOW x TISSUE_WINDOW pixels inside this range.
TISSUE_HU = (-50.0, 130.0)
TISSUE_WINDOW = 7
#: Local noise windows: NOISE_WINDOW x NOISE_WINDOW Haar coefficients (2 px each).
NOISE_WINDOW = 4
NOISE_PERCENTILE = 20.0
#: noise_hu = NOISE_CALIBRATION x percentile: fitted on the simulator's training base slices (chest, head,
#: skull-base, spine; ctiqa simulate --seed 0 --size 128, 480 images): median true/measured ratio for
#: sigma >= 17 HU. bench/bench_findings.py re-derives it.
NOISE_CALIBRATION = 1.48
#: Fewer soft-tissue windows than this: no noise measurement (None).
MIN_NOISE_WINDOWS = 16
#: Streak measure (module docstring, "Streaks"). Angles of V(θ) over 180°: the simulator's full-view grid
#: (ctiqa.simulation.N_FULL_VIEWS), on which every evenly spread view subset is periodic; its 513 angular harmonics
#: reach the 512 of the densest sparse scan the call must not flag.
STREAK_ANGLES = 1024
#: High-pass Gaussian sigma (px): 1 px keeps the finest scales (spokes best resolved, anatomy weakest); residual
#: AUC on the independent sets (bench/bench_findings.py --independent 300): seed 1 0.93 (2 px: 0.92), seed 2 0.91
#: (2 px: 0.91).
STREAK_HIGHPASS_PX = 1.0
#: Largest square measured (px, central crop): bounds the time (a 512x512 image in ~30 ms).
STREAK_MAX_SIZE = 256
#: Angular harmonics searched (periods per 180° = view counts): from just below the simulator's fewest views
#: (ctiqa.simulation.VIEWS_RANGE, 64) to the most a 128-px crop can resolve (π·128/√2 ≈ 284 views).
STREAK_HARMONICS = (60, 290)
#: Width (harmonics) of the running median that gives each harmonic's floor: wide against a single spike, narrow
#: against the floor's fall with the harmonic (anatomy's angular spectrum is steep).
STREAK_FLOOR_HARMONICS = 49
#: streaks = streak_index >= STREAK_THRESHOLD: the 95th percentile of the index over the images without streaks
#: (n_views >= 512) of the simulator's training base slices (ctiqa simulate --seed 0 --size 128, 600 images, the
#: demo's simulation; abdomen held out): a false-call rate of 5 % by construction there. Sensitivity and
#: specificity on the independent sets: bench/bench_findings.py --independent.
STREAK_THRESHOLD = 13.9
#: Is the measured streak call validated against the simulator? Yes when the streak index meets issue 11's bar
#: (residual AUC >= 0.80 after log true σ, n_views < 256 vs >= 512) on the independent-views simulation
#: (bench/bench_findings.py --independent 300: see the README for the figures). When True, claims are checked
#: against the call on any data; the grounded teacher and the audit still use the simulator's truth where it
#: exists (grounding()).
STREAK_CALL_VALIDATED = True


@dataclass(frozen=True)
class Findings:
    """Measured findings of one image (see the module docstring for each field)."""

    id: str
    noise_hu: float | None
    noise_severity: str | None
    streak_index: float | None
    streaks: bool | None
    soft_tissue_fraction: float

    def to_row(self) -> dict[str, Any]:
        """JSON-ready dict (floats rounded: HU to 0.01, index to 0.001)."""
        row = asdict(self)
        if self.noise_hu is not None:
            row["noise_hu"] = round(self.noise_hu, 2)
        if self.streak_index is not None:
            row["streak_index"] = round(self.streak_index, 3)
        row["soft_tissue_fraction"] = round(self.soft_tissue_fraction, 3)
        return row


def image_id(source: str) -> str:
    """The row id of an image read from ``source``: the file stem (``image/0007.tif`` -> ``0007``), ``#N`` kept."""
    path, _, frame = source.partition("#")
    stem = Path(path).stem
    return f"{stem}#{frame}" if frame else stem


def hu_and_valid(img: CTImage) -> tuple[np.ndarray, np.ndarray]:
    """HU pixels and the mask of pixels that carry HU.

    Returns:
        (hu, valid): float64 (H, W) in HU; bool (H, W), False where a windowed image is saturated (0 or 1 for
        ``unit``, 0 or 255 for ``display``). HU images: all valid.
    """
    px = img.pixels.astype(np.float64)
    if img.kind == "hu":
        return px, np.ones(px.shape, bool)
    x = px if img.kind == "unit" else px / 255.0
    valid = (x > 1e-6) & (x < 1.0 - 1e-6)
    return unit_to_hu(x).astype(np.float64), valid


def _haar_hh(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a[:h, :w]
    return (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2.0


def measure_noise(hu: np.ndarray) -> tuple[float | None, float]:
    """Noise standard deviation in HU (module docstring, "Noise").

    Args:
        hu: (H, W) HU (a windowed image's saturated pixels at the window's bounds, as :func:`hu_and_valid`
            gives them).
    Returns:
        (noise_hu or None when fewer than :data:`MIN_NOISE_WINDOWS` windows are soft tissue, soft-tissue fraction).
    """
    from scipy import ndimage

    mean = ndimage.uniform_filter(hu, TISSUE_WINDOW, mode="reflect")
    tissue = (mean > TISSUE_HU[0]) & (mean < TISSUE_HU[1])
    hh = _haar_hh(hu)
    t = tissue[: hh.shape[0] * 2, : hh.shape[1] * 2]
    inside = t[0::2, 0::2] & t[0::2, 1::2] & t[1::2, 0::2] & t[1::2, 1::2]
    num = ndimage.uniform_filter(hh * hh * inside, NOISE_WINDOW, mode="constant")
    den = ndimage.uniform_filter(inside.astype(np.float64), NOISE_WINDOW, mode="constant")
    full = den > 1.0 - 1e-9
    frac = float(tissue.mean())
    if full.sum() < MIN_NOISE_WINDOWS:
        return None, frac
    local = np.sqrt(np.maximum(num[full], 0.0) / den[full])
    return float(NOISE_CALIBRATION * np.percentile(local, NOISE_PERCENTILE)), frac


def streak_profile(hu: np.ndarray) -> np.ndarray:
    """``V(θ)`` (module docstring, "Streaks"): the power spectrum of the high-pass residual (image minus a Gaussian
    blur of :data:`STREAK_HIGHPASS_PX` px) of the central square (at most :data:`STREAK_MAX_SIZE` px), zero-padded
    2x, summed along the radial line at each angle ``k·180/STREAK_ANGLES`` degrees out to the spectrum's edge
    (corners included). By the Fourier slice theorem, the variance of the residual's parallel projections at θ.

    Args:
        hu: (H, W) HU (a windowed image's saturated pixels at the window's bounds, as :func:`hu_and_valid` gives).
    Returns:
        float64 (STREAK_ANGLES,) (arbitrary units, >= 0).
    """
    from scipy import ndimage

    h, w = hu.shape
    n = min(h, w, STREAK_MAX_SIZE)
    y0, x0 = (h - n) // 2, (w - n) // 2
    sq = np.asarray(hu[y0:y0 + n, x0:x0 + n], dtype=np.float64)
    r = sq - ndimage.gaussian_filter(sq, STREAK_HIGHPASS_PX)
    size = 2 * n
    power = np.abs(np.fft.fftshift(np.fft.fft2(r, (size, size)))) ** 2
    theta = np.arange(STREAK_ANGLES) * np.pi / STREAK_ANGLES
    c = size // 2
    rho = np.arange(1, int(c * np.sqrt(2.0)))
    coords = [c + np.outer(np.sin(theta), rho), c + np.outer(np.cos(theta), rho)]
    return ndimage.map_coordinates(power, coords, order=1, mode="constant", cval=0.0).sum(axis=1)


def streak_index(profile: np.ndarray) -> float:
    """Periodicity of ``V(θ)`` at a view count: ``max P(h) / median(P(h - 24 .. h + 24))`` over h in
    :data:`STREAK_HARMONICS`, ``P`` the power spectrum of ``log V`` over its angles (h = periods per 180°; the
    floor a running median over :data:`STREAK_FLOOR_HARMONICS` harmonics). Dimensionless, >= 0; about 9 without
    periodicity; 0 for an empty profile (a flat image) or one too short to hold the harmonics.

    Args:
        profile: (A,) ``V(θ)`` at A angles evenly over 180° (:func:`streak_profile`; A >= 2 x the top harmonic).
    """
    from scipy import ndimage

    v = np.asarray(profile, dtype=np.float64)
    lo, hi = STREAK_HARMONICS
    if v.size < 2 * hi or not np.isfinite(v).all() or v.min() <= 0:
        return 0.0
    lv = np.log(v)
    p = np.abs(np.fft.rfft(lv - lv.mean())) ** 2
    floor = ndimage.median_filter(p, STREAK_FLOOR_HARMONICS, mode="nearest")[lo:hi + 1]
    ok = floor > 0
    return float((p[lo:hi + 1][ok] / floor[ok]).max()) if ok.any() else 0.0


def measure_findings(image: CTImage, id: str | None = None) -> Findings:
    """Measure noise and streaks of one CT image (module docstring).

    Args:
        image: a :class:`ctiqa.imaging.CTImage` (HU, LDCTIQA [0, 1] or 8-bit display; read with
            :func:`ctiqa.imaging.read_ct`).
        id: row id (default: :func:`image_id` of ``image.source``).
    Returns:
        :class:`Findings`.
    Raises:
        CTIQAError: the image is smaller than 32x32 pixels (nothing to measure), naming ``id`` (else its source).
    """
    if min(image.shape) < 32:  # named by its id when given: a DICOM file's name may be a UID
        raise CTIQAError(f"{id if id is not None else image.source}: image of {image.shape[1]}x{image.shape[0]} px "
                         "is too small to measure")
    hu, _ = hu_and_valid(image)
    noise, frac = measure_noise(hu)
    # Streaks are measured in the soft-tissue window for every input: the domain STREAK_THRESHOLD was calibrated in
    # (LDCTIQA-style [0, 1] images) and what the model sees; full-range HU (bone, air edges) gives another index.
    idx = streak_index(streak_profile(unit_to_hu(hu_to_unit(hu)) if image.kind == "hu" else hu))
    return Findings(id=id if id is not None else image_id(image.source), noise_hu=noise,
                    noise_severity=noise_severity(noise) if noise is not None else None,
                    streak_index=idx, streaks=idx >= STREAK_THRESHOLD, soft_tissue_fraction=frac)


def measure_rendered(image: Any, id: str) -> Findings:
    """Findings of a rendered RGB image (what the model sees: ``ctiqa.imaging.render``).

    Args:
        image: PIL image or uint8 array (H, W) / (H, W, 3). Grey RGB (soft-tissue encoding) is read as the
            W350/L40 display; a "medgemma-3window" image (channels differ) is read from its soft-tissue channel
            (:data:`SOFT_TISSUE_CHANNEL`).
        id: row id.
    Returns:
        :class:`Findings` (as :func:`measure_findings` of a ``display`` image).
    """
    a = np.asarray(image)
    if a.ndim == 3:
        same = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
        a = a[..., 0] if same else a[..., SOFT_TISSUE_CHANNEL]
    return measure_findings(CTImage(a.astype(np.float32), "display", id), id)


def grounding(findings: dict[str, Any] | None, metadata: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What the grounded teacher is told and the audit checks against, for one image.

    Args:
        findings: :meth:`Findings.to_row` of the image (None: not measurable -> no grounding).
        metadata: the image's degradation record on simulated data (``n_views``), else None.
    Returns:
        None, or ``noise_hu``, ``noise_severity`` (measured), ``streaks`` (True/False, or None when nothing
        trustworthy is known) and ``streaks_source``: "simulator" (``n_views < 512``: the simulator's truth,
        which also knows the mild 256-511-view streaks the measured call mostly misses, stands in wherever it
        exists), "measured" (no simulator truth and :data:`STREAK_CALL_VALIDATED`), or "unmeasured";
        ``absent_artifacts``: artifacts known not to be in the image (:data:`ctiqa.simulation.ABSENT_ARTIFACTS` on
        simulated data, names of :data:`ctiqa.vocabulary.OTHER_ARTIFACTS`; ``()`` elsewhere: unknown).
    """
    if findings is None:
        return None
    from ctiqa.simulation import ABSENT_ARTIFACTS
    from ctiqa.vocabulary import STREAK_VIEWS_BELOW

    n_views = (metadata or {}).get("n_views")
    if n_views is not None:
        streaks, source = int(n_views) < STREAK_VIEWS_BELOW, "simulator"
    elif STREAK_CALL_VALIDATED:
        streaks, source = findings.get("streaks"), "measured"
    else:
        streaks, source = None, "unmeasured"
    return {"noise_hu": findings.get("noise_hu"), "noise_severity": findings.get("noise_severity"),
            "streaks": streaks, "streaks_source": source,
            "absent_artifacts": ABSENT_ARTIFACTS if n_views is not None else ()}


def rationale_fields(image: Any, text: str | None) -> dict[str, Any]:
    """Flat fields for a ``ctiqa predict`` row: the measured findings of the rendered image and the flags of its
    rationale (:func:`ctiqa.explanations.findings_check`, :func:`ctiqa.explanations.faithfulness_flags`).

    Returns ``{}`` without a rationale (score-only rows stay fast); else ``noise_hu``, ``noise_severity``,
    ``streak_index``, ``streaks``, ``faithfulness_flags`` ("; "-joined, "" when nothing is flagged).
    """
    if not text:
        return {}
    from ctiqa.explanations import faithfulness_flags, findings_check

    try:
        row = measure_rendered(image, "").to_row()
    except CTIQAError:
        return {}
    flags = faithfulness_flags(findings_check(text, row))
    return {k: row[k] for k in ("noise_hu", "noise_severity", "streak_index", "streaks")} | {
        "faithfulness_flags": "; ".join(flags)}


def attach_findings(records: list[dict[str, Any]], images: dict[str, Any]) -> int:
    """Add ``findings`` (:meth:`Findings.to_row`) to each record whose ``id`` has an image and that has a
    ``text`` (only rationales need them). Returns how many were measured; unmeasurable images get None."""
    n = 0
    for r in records:
        img = images.get(str(r.get("id")))
        if r.get("text") and img is not None and "findings" not in r:
            try:
                r["findings"] = measure_rendered(img, str(r["id"])).to_row()
                n += 1
            except CTIQAError:
                r["findings"] = None
    return n


# ------------------------------------------------------------------------------------------------------- CLI
def iter_images(inputs: list[str], *, file_names: bool = False) -> Any:
    """Yield (id, CTImage or CTIQAError) for each image of the inputs: TIFF/PNG/JPEG files (id: the file stem,
    ``#N`` per frame), DICOM files (id ``dicom#K`` for the K-th DICOM file input, ``dicom#K/N`` for frame N; the
    file stem with ``file_names``), LDCTIQA-style folders (an ``image/`` or ``images/`` folder of TIFFs: ids are the
    file stems), DICOM series folders (id ``FOLDER/i`` for slice i along the slice normal, ``FOLDER#k/i`` for
    series k of several; ``series#K`` instead of FOLDER when its path holds a DICOM UID, unless ``file_names``)
    and folders of TIFF/PNG/JPEG slices (:func:`ctiqa.imaging.image_files`; ids: file stems, or ``FOLDER/i`` by
    position when the folder or its files are named by a UID); a TIFF/PNG file named by a UID is ``image#K``;
    a folder with nothing readable is one error row, the other inputs go on. Exported DICOM file names are often SOP Instance UIDs, so they stay out of ids and error
    messages (replaced by the id) unless ``file_names``."""
    from ctiqa.imaging import image_files, names_a_uid, read_dicom_folder
    from ctiqa.ldctiqa import load_ldctiqa

    n_dicom = n_uid = n_image = 0
    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and any((p / d).is_dir() for d in ("image", "images")):
            ds = load_ldctiqa(p, require_labels=False, check_images=False)
            for i in ds.ids:
                try:
                    yield i, ds.read(i)
                except CTIQAError as e:
                    yield i, e
        elif p.is_dir():  # a DICOM series: ids by position, never file names (often SOP Instance UIDs)
            name = p.name
            if names_a_uid(p) and not file_names:  # a PACS export's Study/Series UID folder: not in the ids
                n_uid += 1
                name = f"series#{n_uid}"
            errors: list[tuple[str, str]] = []
            try:
                found = read_dicom_folder(p, errors=errors)
            except CTIQAError as e:  # no DICOM: a folder of TIFF/PNG slices (ids: file stems), or nothing readable
                slices = image_files(p)
                if not slices:
                    yield name, (e if file_names else CTIQAError(_without_name(str(e), raw, name)))
                elif file_names or (name == p.name and not any(names_a_uid(f.name) for f in slices)):
                    yield from iter_images([str(f) for f in slices], file_names=file_names)
                else:  # slices converted from an export keep its UID names: ids by position, as a DICOM series
                    for i, f in enumerate(slices):
                        yield from _frames_named(f, f"{name}/{i}", "#")
                continue
            for k, series in enumerate(found, start=1):
                sid = f"{name}#{k}" if len(found) > 1 else name
                for i, (_, img) in enumerate(series):
                    yield f"{sid}/{i}", img
            for i, (path, msg) in enumerate(errors):
                rid = f"{name}/unreadable-{i}"
                yield rid, CTIQAError(msg if file_names else _without_name(msg, path, rid))
        elif p.is_file() and is_dicom_file(p) and not file_names:
            n_dicom += 1
            yield from _frames_named(p, f"dicom#{n_dicom}", "/")
        elif names_a_uid(raw) and not file_names:  # a TIFF/PNG named by a UID (converted from an export)
            n_image += 1
            yield from _frames_named(p, f"image#{n_image}", "/")
        else:
            try:
                for img in read_ct_frames(p):
                    yield image_id(img.source), img
            except CTIQAError as e:
                yield image_id(raw), e


def _frames_named(path: Path, rid: str, sep: str) -> Any:
    """(id, CTImage or CTIQAError) for each frame of ``path`` under the id ``rid`` (``rid{sep}k`` for frame k of
    several), never under its file name: an error's message has the path replaced by ``rid``."""
    try:
        frames = read_ct_frames(path)
    except CTIQAError as e:
        yield rid, CTIQAError(_without_name(str(e), str(path), rid))
        return
    for k, img in enumerate(frames):
        yield (f"{rid}{sep}{k}" if len(frames) > 1 else rid), img


def _without_name(message: str, path: str, rid: str) -> str:
    """``message`` with the file's path and name (which may be a UID) replaced by the row id ``rid``."""
    return message.replace(str(path), rid).replace(Path(path).name, rid)


def is_findings_file(path: Path) -> bool:
    """True when every line of ``path`` is a findings row (a JSON object with exactly the :class:`Findings` keys):
    a file ``ctiqa findings --out`` wrote, which a re-run may replace. Unreadable or other JSON: False."""
    keys = {f.name for f in fields(Findings)}
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        rows = [json.loads(ln) for ln in lines]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return bool(rows) and all(isinstance(r, dict) and set(r) == keys for r in rows)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ctiqa findings``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="DICOM/TIFF/PNG file, DICOM series folder, or LDCTIQA-style folder (image/*.tif)")
    parser.add_argument("--out", type=Path, help="write one JSON row per image to FILE.jsonl")
    parser.add_argument("--file-names", action="store_true",
                        help="id DICOM files given directly by their file stem and name unreadable DICOM files in "
                        "messages; off by default because exported DICOM files are often named by their SOP "
                        "Instance UID (their ids are then dicom#1, dicom#2... in input order)")


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa findings``: print (and write) one row per image. Exit 0 when at least one image was measured."""
    if args.out is not None and args.out.suffix != ".jsonl":
        raise CTIQAError(f"{args.out}: output must end in .jsonl")
    if args.out is not None:
        # before any work: never replace a file ctiqa findings did not write, nor an input
        check_output_path(args.out, ours=is_findings_file, inputs=args.inputs,
                          hint="give a new file name, or an earlier `ctiqa findings --out` file")
    rows, n_bad = [], 0
    seen: dict[str, int] = {}
    for rid, img in iter_images(args.inputs, file_names=args.file_names):
        if isinstance(img, CTIQAError):
            print(f"skipped: {img}", file=sys.stderr)
            n_bad += 1
            continue
        if rid in seen:  # two inputs with files of one name (a/x.tif, b/x.tif; two LDCTIQA folders): keep rows apart
            seen[rid] += 1
            print(f"note: id {rid} is given by more than one image; this one is {rid}~{seen[rid]}", file=sys.stderr)
            rid = f"{rid}~{seen[rid]}"
        seen.setdefault(rid, 1)
        try:
            row = measure_findings(img, rid).to_row()
        except CTIQAError as e:
            print(f"skipped: {e}", file=sys.stderr)
            n_bad += 1
            continue
        rows.append(row)
        noise = f"{row['noise_hu']:7.1f} HU {row['noise_severity']:<8}" if row["noise_hu"] is not None else \
            f"{'n/a':>10} {'':<8}"
        print(f"{rid:<24} noise {noise} streaks {'yes' if row['streaks'] else 'no ':<3} "
              f"(index {row['streak_index']:.1f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {args.out}")
    if n_bad:
        print(f"{n_bad} input(s) skipped", file=sys.stderr)
    return 0 if rows else 1

