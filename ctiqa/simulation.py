"""Mini-LDCTIQA from real CT: a projection-domain low-dose + sparse-view simulation with SYNTHETIC scores.

``ctiqa simulate --out DIR`` writes the LDCTIQA 2023 training layout (``DIR/image/NNNN.tif`` float32 [0, 1]
soft-tissue window W350/L40, ``DIR/train.json`` ``{"0000.tif": 2.8, ...}``) from the real CT slices that
pydicom and pydicom-data ship, plus ``DIR/degradations.json`` (how each image was made) and ``DIR/README.txt``.
The scores are a formula of the simulated dose and view count, NOT radiologist ratings; every output says so.

Physics (design.md §4), per base slice
--------------------------------------
1. HU (read by :func:`ctiqa.imaging.read_ct`, the one pixel path) -> linear attenuation
   ``mu = MU_WATER_PER_MM · (1 + max(HU, -1000) / 1000)`` (1/mm) with the slice's own DICOM pixel spacing (mm).
2. Parallel-beam Radon transform (:func:`skimage.transform.radon`) at :data:`N_FULL_VIEWS` views over 180°
   -> line integrals ``p`` (dimensionless). Computed once per base slice and cached (memory + disk). Slices with
   a cropped field of view (tissue along the image border) first get a margin that fades the border tissue to
   air (:func:`attenuation_map`), else the square's tissue/air edge would streak 3-4x more than a whole body.
3. Reference: the noiseless full-view filtered back-projection ``ref = FBP_1024(p)``.
4. Noise calibration (the analogue of automatic tube-current modulation): the full-dose photon count ``I0``
   is chosen per base slice so that the quantum noise added at (dose 1.0, 1024 views) has a standard deviation
   of :data:`FULL_DOSE_NOISE_HU` over the slice's soft-tissue pixels. Without it the 128² chest slice (short
   ray paths) would get a quarter of the abdomen's noise at the same "dose" and the score would mean different
   things on different slices. (With a fixed ``I0 = 3e6`` the abdomen gets 8.7 HU, the design note's "~9 HU".)
5. One degradation level ``(dose fraction d, n views)``: keep ``n`` of the 1024 views (evenly spaced
   indices ``floor(k·1024/n)``), draw transmitted counts ``N ~ Poisson(I0·d·exp(-p))``, ``p̂ = -ln(max(N, 1) /
   (I0·d))``, reconstruct ``deg = FBP_n(p̂)`` (ramp filter, linear interpolation).
6. Output HU = original + (deg - ref), in HU. The reference is the noiseless recon with ALL views: the
   difference then holds the quantum noise AND the sparse-view streaks (both absent from ``ref``), while the
   blur that the projector/FBP pair adds cancels, so the original resolution and anatomy are kept. (A
   reference built from the same ``n`` views would cancel the streaks and leave only noise.)
7. LDCTIQA representation: :func:`ctiqa.imaging.hu_to_unit` (``clip((HU + 135) / 350, 0, 1)``), float32.

The quantum noise scales as ``FULL_DOSE_NOISE_HU / sqrt(d · n / 1024)`` (per-view counts ``I0·d``, FBP noise
variance ~ 1 / total photons): measured within 1 % on every base slice, 3-4 % above it at the lowest counts
(0.1, 64 views); it is recorded as ``noise_sigma_hu``.
``dose_fraction`` is the tube-current fraction per view; the total relative dose is ``d · n / 1024``.

Synthetic score (:func:`synthetic_score`)
-----------------------------------------
``score = 4 · (1 - 0.4 · log10(1 / d) - 0.6 · log16(1024 / n))``, clipped to [0, 4], written rounded to 0.1:
4 at (1.0, 1024), 0 at (0.1, 64), monotone (strictly) in both. Per log unit, views weigh 1.25x dose because
sparse views add streaks on top of the noise (on the abdomen slice lines of equal added-HU std run at a slope of
1.1-1.5). Levels are drawn so the scores of each base slice are spread evenly over [0, 4].

Crops
-----
``--size`` smaller than a slice cuts crops at native resolution (downsampling would average the noise away):
positions are seeded and each crop holds at least :data:`MIN_TISSUE_FRACTION` of pixels inside the soft-tissue
window in the original. Each level (one noise realisation) is back-projected once, at the pixels of its crops
only (:func:`fbp` with pixel indices; a few crops per level, overlapping by at most :data:`MAX_CROP_OVERLAP`
where the slice allows). Slices smaller than ``--size`` are skipped; a slice of exactly ``--size`` is used
whole.

``degradations.json``
--------------------
``synthetic: true``, ``note``, ``test_base_slices``, ``seed``, ``size``, ``score_formula``, ``physics``,
``base_slices`` (file, anatomy, pixel spacing in mm, calibrated ``i0_full_dose``, images per slice) and
``images``: per file ``base_slice``, ``source_file``, ``frame``, ``level`` (reconstruction index within the
slice; crops of one level share its noise realisation), ``dose_fraction``, ``n_views``, ``relative_total_dose``
(``d · n / 1024``), ``score`` (as in ``train.json``), ``crop`` ``[y, x, size]`` (pixels of the slice in standard
display orientation), ``added_noise_hu`` (measured std of output - original HU over the crop's soft-tissue
pixels: noise and streaks), ``noise_sigma_hu`` (expected quantum noise alone), ``synthetic: true``.

Base slices (:data:`BASE_SLICES`; inspected one by one, rendered and HU checked)
--------------------------------------------------------------------------------
chest (CT_small.dcm, 128², thoracic spine and posterior chest, 0.66 mm; cropped field of view, mild horizontal
streaks of its own), head (693_UNCR.dcm, 512² brain, 0.48 mm), abdomen (explicit_VR-UN.dcm, 512²
contrast-enhanced upper abdomen, TCIA Pancreas-CT, 0.86 mm; read_ct flips it to the standard orientation),
skull-base (J2K_pixelrep_mismatch.dcm, 512² posterior fossa, 0.43 mm; decoded HU sane: brain ~35, fat ~-100, its
-2000 padding becomes air), spine (bad_sequence.dcm, 512² thoraco-lumbar spine and posterior upper abdomen, 0.29
mm, JPEG lossless). Excluded: eCT_Supplemental.dcm (enhanced CT, 2 frames: a skull-stripped brain whose sulci
and CSF are set to -1024 HU; not realistic CT) and 693_J2KI/J2KR/UNCI.dcm (the same slice as 693_UNCR
re-encoded). Default held-out test slice: ``abdomen`` (LDCTIQA is abdominal; ``degradations.json``
``test_base_slices``), so a model can be tested on anatomy it never saw in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctiqa import CTIQAError, __version__
from ctiqa.imaging import SOFT_TISSUE, hu_to_unit, read_ct
from ctiqa.ldctiqa import DEGRADATIONS_FILE, SIMULATION_MARKER
from ctiqa.paths import atomic_write, check_output_path, move_aside
from ctiqa.scale import SCORE_MAX

# --------------------------------------------------------------------------------------------------------------
# Constants (each with its source)
# --------------------------------------------------------------------------------------------------------------

#: Linear attenuation of water (1/mm) at ~70 keV, the effective energy of a 120 kVp spectrum: NIST XCOM mass
#: attenuation of water 0.193 cm²/g at 70 keV; design.md §4.
MU_WATER_PER_MM = 0.0192
#: Views over 180° of the full-view sinogram (design.md §4: ~1024; above the ~800 that 512 px need).
N_FULL_VIEWS = 1024
#: FBP filter (skimage name): the standard ramp (Ram-Lak) filter of filtered back-projection.
FBP_FILTER = "ramp"
#: Quantum noise (HU std over soft-tissue pixels) added at full dose and all views. design.md §4 ("I0 ≈ 3e6 gives
#: ~9 HU"): here it is the calibration target per base slice.
FULL_DOSE_NOISE_HU = 9.0
#: Dose-fraction and view-count range of the quality ladder (design.md §4: (1.0, 1024) down to (0.1, 64)).
DOSE_RANGE = (0.1, 1.0)
VIEWS_RANGE = (64, N_FULL_VIEWS)
#: Weight of the dose term in the synthetic score (the view term gets 1 - this); see the module docstring.
SCORE_DOSE_WEIGHT = 0.4
#: A crop must hold at least this fraction of pixels inside the soft-tissue window (HU -135..215) of the original.
MIN_TISSUE_FRACTION = 0.5
#: Most crops cut from one reconstructed level, and the most two crops of one level may overlap (area fraction).
MAX_CROPS_PER_LEVEL = 8
MAX_CROP_OVERLAP = 0.25
#: A slice whose border is more than this fraction tissue (HU > -500) is a cropped field of view (CT_small,
#: bad_sequence): it gets an edge-replicated margin of N // TRUNCATION_MARGIN_DIVISOR pixels tapered to air by a
#: half cosine before projection. Without it the artificial tissue/air step along the image border makes
#: sparse-view streaks 3-4x stronger than in whole-body slices (spine slice at 64 views: 214 HU -> 49 HU with
#: the margin; abdomen 61 HU).
TRUNCATION_BORDER_FRACTION = 0.05
TRUNCATION_MARGIN_DIVISOR = 8
#: Views and photon count of the noise-calibration reconstruction (noise variance ∝ 1 / (views · I0)).
CALIBRATION_VIEWS = 128
CALIBRATION_I0 = 1e6
CALIBRATION_SEED = 20230417
#: Default held-out base slice(s) for the test split.
DEFAULT_TEST_BASE_SLICES = ("abdomen",)
#: Written first into the output folder: a re-run may replace a folder holding it (an interrupted run).
MARKER_FILE = SIMULATION_MARKER
#: Bump when the physics changes: it keys the on-disk sinogram cache.
PHYSICS_VERSION = "2"

SYNTHETIC_NOTE = (
    "SYNTHETIC data: real CT slices shipped by pydicom / pydicom-data, degraded by a simulated low-dose "
    "(Poisson noise) and sparse-view acquisition; the scores are a formula of the simulated dose and view count "
    "(synthetic scores, not radiologist ratings). For testing the pipeline, not for judging image quality."
)


@dataclass(frozen=True)
class BaseSlice:
    """A real CT slice used as simulation input.

    Attributes:
        name: short id written to ``degradations.json`` (``base_slice``) and accepted by ``--test-base-slices``.
        filename: file name in pydicom's / pydicom-data's test data (:func:`pydicom.data.get_testdata_file`).
        frame: frame index for multi-frame files, else ``None``.
        anatomy: what the slice shows (from looking at it; no DICOM metadata).
    """

    name: str
    filename: str
    frame: int | None
    anatomy: str


BASE_SLICES: tuple[BaseSlice, ...] = (
    BaseSlice("chest", "CT_small.dcm", None, "thoracic spine and posterior chest, 128x128, cropped field of view"),
    BaseSlice("head", "693_UNCR.dcm", None, "brain, supratentorial, 512x512"),
    BaseSlice("abdomen", "explicit_VR-UN.dcm", None, "contrast-enhanced upper abdomen (TCIA Pancreas-CT), 512x512"),
    BaseSlice("skull-base", "J2K_pixelrep_mismatch.dcm", None, "posterior fossa and skull base, 512x512"),
    BaseSlice("spine", "bad_sequence.dcm", None, "thoraco-lumbar spine, posterior upper abdomen, 512x512"),
)

#: Artifacts that no simulated image has (names of :data:`ctiqa.vocabulary.OTHER_ARTIFACTS`): the simulator adds only
#: quantum noise and sparse-view streaks, and the :data:`BASE_SLICES`, inspected one by one (rendered in both
#: encodings: no star-burst streaks or values near 3071 HU, no concentric rings, no doubled edges), show no metal, ring
#: or motion artifacts. A rationale claiming one of them on simulated data contradicts the truth
#: (:func:`ctiqa.findings.grounding`, ``datasets_builder.checks``: ``contradicts_findings``). Beam hardening is not
#: listed: a real skull-base slice can show residual beam hardening, so such a claim stays unverified (flagged).
ABSENT_ARTIFACTS: tuple[str, ...] = ("metal", "ring", "motion")

#: Files looked at and left out, with the reason.
EXCLUDED_FILES: dict[str, str] = {
    "eCT_Supplemental.dcm": "skull-stripped brain with sulci/CSF set to -1024 HU: not realistic CT",
    "693_J2KI.dcm": "same slice as 693_UNCR.dcm (lossy JPEG 2000 re-encoding)",
    "693_J2KR.dcm": "same slice as 693_UNCR.dcm (lossless JPEG 2000 re-encoding)",
    "693_UNCI.dcm": "same slice as 693_UNCR.dcm (implicit VR re-encoding)",
}


# --------------------------------------------------------------------------------------------------------------
# Scores and degradation levels
# --------------------------------------------------------------------------------------------------------------


def synthetic_score(dose_fraction: float, n_views: int) -> float:
    """The synthetic quality score of a degradation level (unrounded; written rounded to 0.1).

    ``4 · (1 - 0.4 · log10(1/d) - 0.6 · log16(1024/n))`` clipped to [0, 4]: 4.0 at (1.0, 1024), 0.0 at (0.1, 64),
    strictly decreasing in dose loss and view loss inside :data:`DOSE_RANGE` × :data:`VIEWS_RANGE`.

    Args:
        dose_fraction: per-view tube-current fraction d in (0, 1].
        n_views: views kept out of :data:`N_FULL_VIEWS` (>= 1).

    Raises:
        ValueError: dose not in (0, 1] or views not in [1, 1024].
    """
    if not 0 < dose_fraction <= 1:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose_fraction}")
    if not 1 <= n_views <= N_FULL_VIEWS:
        raise ValueError(f"n_views must be in [1, {N_FULL_VIEWS}], got {n_views}")
    x_dose = math.log(1.0 / dose_fraction) / math.log(DOSE_RANGE[1] / DOSE_RANGE[0])
    x_views = math.log(N_FULL_VIEWS / n_views) / math.log(VIEWS_RANGE[1] / VIEWS_RANGE[0])
    q = SCORE_DOSE_WEIGHT * x_dose + (1.0 - SCORE_DOSE_WEIGHT) * x_views
    return min(SCORE_MAX, max(0.0, SCORE_MAX * (1.0 - q)))


def expected_noise_hu(dose_fraction: float, n_views: int) -> float:
    """Expected quantum-noise std (HU) at a level: ``FULL_DOSE_NOISE_HU / sqrt(d · n / 1024)`` (calibrated)."""
    return FULL_DOSE_NOISE_HU / math.sqrt(dose_fraction * n_views / N_FULL_VIEWS)


def level_for_score(target: float, split: float) -> tuple[float, int]:
    """A (dose fraction, views) pair whose synthetic score is about ``target``.

    Args:
        target: wanted score in [0, 4].
        split: in [0, 1]: which of the pairs on that score's iso-line (0: as much dose loss as possible... 1:
            as little), so seeded draws cover both kinds of degradation.

    Returns:
        ``(dose, n_views)``: dose rounded to 0.001 within :data:`DOSE_RANGE`, integer views within
        :data:`VIEWS_RANGE`. Compute the exact score with :func:`synthetic_score` (view rounding moves it).
    """
    q = 1.0 - min(SCORE_MAX, max(0.0, target)) / SCORE_MAX
    w = SCORE_DOSE_WEIGHT
    lo, hi = max(0.0, (q - (1 - w)) / w), min(1.0, q / w)
    x_dose = hi - split * (hi - lo)
    x_views = min(1.0, max(0.0, (q - w * x_dose) / (1 - w)))
    dose = round(DOSE_RANGE[1] * (DOSE_RANGE[0] / DOSE_RANGE[1]) ** x_dose, 3)
    views = round(VIEWS_RANGE[1] * (VIEWS_RANGE[0] / VIEWS_RANGE[1]) ** x_views)
    return min(max(dose, DOSE_RANGE[0]), DOSE_RANGE[1]), int(min(max(views, VIEWS_RANGE[0]), VIEWS_RANGE[1]))


# --------------------------------------------------------------------------------------------------------------
# Physics
# --------------------------------------------------------------------------------------------------------------


def full_view_angles() -> np.ndarray:
    """The :data:`N_FULL_VIEWS` projection angles in degrees, evenly spaced over [0, 180), float64."""
    return np.arange(N_FULL_VIEWS, dtype=np.float64) * (180.0 / N_FULL_VIEWS)


def view_indices(n_views: int) -> np.ndarray:
    """Indices of the ``n_views`` views kept out of 1024: ``floor(k · 1024 / n)``, k = 0..n-1 (evenly spread)."""
    if not 1 <= n_views <= N_FULL_VIEWS:
        raise ValueError(f"n_views must be in [1, {N_FULL_VIEWS}], got {n_views}")
    return (np.arange(n_views) * N_FULL_VIEWS) // n_views


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """HU -> linear attenuation (1/mm): ``MU_WATER_PER_MM · (1 + max(HU, -1000) / 1000)``, float64 (air -> 0)."""
    return MU_WATER_PER_MM * (1.0 + np.maximum(np.asarray(hu, dtype=np.float64), -1000.0) / 1000.0)


def attenuation_map(hu: np.ndarray) -> tuple[np.ndarray, int]:
    """The attenuation image that is projected: :func:`hu_to_mu` of the slice, plus a margin when it is cropped.

    A slice whose border holds more than :data:`TRUNCATION_BORDER_FRACTION` tissue (HU > -500) was reconstructed
    on a field of view smaller than the body. It is extended by ``m = N // TRUNCATION_MARGIN_DIVISOR`` pixels on
    each side, replicating the border values and fading them to air with a half-cosine taper, so the projections
    see a body that ends smoothly instead of a tissue/air step along a square.

    Returns:
        ``(mu, m)``: float64 (N + 2m, N + 2m) attenuation in 1/mm, and the margin m (0 for whole-body slices).
    """
    mu = hu_to_mu(hu)
    n = mu.shape[0]
    border = np.concatenate([hu[0], hu[-1], hu[:, 0], hu[:, -1]])
    if (border > -500).mean() <= TRUNCATION_BORDER_FRACTION:
        return mu, 0
    m = n // TRUNCATION_MARGIN_DIVISOR
    dist = np.maximum(np.abs(np.arange(n + 2 * m) - (n + 2 * m - 1) / 2) - (n - 1) / 2, 0)  # 0 inside the slice
    taper = 0.5 * (1 + np.cos(np.pi * np.minimum(dist / m, 1.0)))
    return np.pad(mu, m, mode="edge") * taper[:, None] * taper[None, :], m


def forward_project(mu: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Full-view parallel-beam sinogram (:func:`skimage.transform.radon`, ``circle=False``) of a square
    attenuation image.

    Args:
        mu: (M, M) attenuation in 1/mm (:func:`attenuation_map`).
        spacing_mm: pixel spacing (mm); detector bins have the same size.

    Returns:
        float64 (ceil(M·√2), 1024) line integrals ``∫ mu dl`` (dimensionless), angles :func:`full_view_angles`.
    """
    from skimage.transform import radon

    return radon(mu, full_view_angles(), circle=False, preserve_range=True) * spacing_mm


def ramp_filter(n_padded: int) -> np.ndarray:
    """Frequency response (n_padded, 1) of the ramp (Ram-Lak) filter built in the spatial domain (Kak & Slaney,
    Principles of Computerized Tomographic Imaging, 1988, ch. 3 eq. 61), exactly as skimage's ``iradon`` builds
    its ``"ramp"`` filter. ``n_padded`` must be even."""
    from scipy.fft import fft

    n = np.concatenate((np.arange(1, n_padded / 2 + 1, 2, dtype=int), np.arange(n_padded / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(n_padded)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    return 2 * np.real(fft(f))[:, None]


def fbp(
    sinogram: np.ndarray,
    angles_deg: np.ndarray,
    spacing_mm: float,
    size: int,
    pixels: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Filtered back-projection of line integrals, on the whole grid or only at chosen pixels.

    The same computation as :func:`skimage.transform.iradon` (``filter_name="ramp"``, linear interpolation,
    ``circle=False``, ``output_size=size``; a test checks they agree to 1e-12): zero-padded ramp filtering, then
    back-projection along ``t = (col - r)·cos θ - (row - r)·sin θ`` with ``r = size // 2``, times π / (2·views).
    Back-projecting only the pixels of the crops makes a degradation level several times cheaper than a full
    512² reconstruction, which skimage cannot restrict.

    Args:
        sinogram: (D, V) line integrals (dimensionless), detector centre at D // 2.
        angles_deg: (V,) projection angles in degrees.
        spacing_mm: pixel (and detector bin) size in mm.
        size: side of the square image grid (pixels).
        pixels: ``(rows, cols)`` integer index arrays, broadcastable against each other (e.g. (k, s, 1) and
            (k, 1, s) for k square crops: then ``t`` costs one pass per view); ``None``: the whole grid.

    Returns:
        float64 attenuation (1/mm): (size, size), or the broadcast shape of ``rows`` and ``cols``.
    """
    from scipy.fft import fft, ifft

    d, v = sinogram.shape
    if len(angles_deg) != v:
        raise ValueError(f"{len(angles_deg)} angles for a sinogram with {v} views")
    n_padded = max(64, int(2 ** np.ceil(np.log2(2 * d))))
    padded = np.pad(sinogram / spacing_mm, ((0, n_padded - d), (0, 0)))
    filtered = np.real(ifft(fft(padded, axis=0) * ramp_filter(n_padded), axis=0)[:d])
    if pixels is None:
        rows, cols = np.ogrid[:size, :size]
    else:
        rows, cols = (np.asarray(a) for a in pixels)
    r = size // 2
    xr = (rows - r).astype(np.float64)
    yc = (cols - r).astype(np.float64)
    x = np.arange(d) - d // 2
    out = np.zeros(np.broadcast_shapes(xr.shape, yc.shape), dtype=np.float64)
    for col, angle in zip(filtered.T, np.deg2rad(angles_deg), strict=True):
        out += np.interp(yc * np.cos(angle) - xr * np.sin(angle), x, col, left=0, right=0)
    return out * (np.pi / (2 * v))


def noisy_line_integrals(p: np.ndarray, i0: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson transmitted counts at ``i0`` photons per ray: ``-ln(max(Poisson(i0·exp(-p)), 1) / i0)``, float64."""
    counts = rng.poisson(i0 * np.exp(-p))
    return -np.log(np.maximum(counts, 1) / i0)


def mu_to_hu_difference(d_mu: np.ndarray) -> np.ndarray:
    """A difference of attenuations (1/mm) in HU: ``1000 · d_mu / MU_WATER_PER_MM``."""
    return d_mu * (1000.0 / MU_WATER_PER_MM)


def soft_tissue_mask(hu: np.ndarray) -> np.ndarray:
    """Pixels inside the soft-tissue window W350/L40 (HU -135..215), bool."""
    level, width = SOFT_TISSUE
    return (hu >= level - width / 2) & (hu <= level + width / 2)


@dataclass
class Projections:
    """Everything a base slice needs for any number of degradation levels.

    Attributes:
        name: base-slice name.
        hu: float32 (N, N) original HU (standard display orientation, as :func:`ctiqa.imaging.read_ct` gives).
        spacing_mm: pixel spacing (mm).
        sinogram: float64 (D, 1024) noiseless line integrals of the (N + 2·margin)² attenuation map.
        reference: float64 (N, N) noiseless full-view FBP (1/mm) on the slice's pixels.
        i0: full-dose photons per ray (calibrated: :data:`FULL_DOSE_NOISE_HU` at (1.0, 1024)).
        i0_fixed_noise_hu: noise (HU) that the fixed design value ``I0 = 3e6`` would give, for the record.
        margin: pixels added on each side before projection (:func:`attenuation_map`; 0 for whole-body slices).
    """

    name: str
    hu: np.ndarray
    spacing_mm: float
    sinogram: np.ndarray
    reference: np.ndarray
    i0: float
    i0_fixed_noise_hu: float
    margin: int = 0

    def recon(
        self, sinogram: np.ndarray, angles_deg: np.ndarray, pixels: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """:func:`fbp` of (a view subset of) this slice's sinogram at slice pixels ``(rows, cols)`` (``None``: all
        N × N), accounting for the margin. Returns float64 1/mm: (N, N) or the broadcast shape of rows, cols."""
        return _recon(sinogram, angles_deg, self.spacing_mm, self.hu.shape[0], self.margin, pixels)


def _recon(sinogram, angles_deg, spacing_mm: float, n: int, margin: int, pixels) -> np.ndarray:
    rows, cols = np.ogrid[:n, :n] if pixels is None else (np.asarray(a) for a in pixels)
    return fbp(sinogram, angles_deg, spacing_mm, n + 2 * margin, pixels=(rows + margin, cols + margin))


def calibrate_i0(sinogram: np.ndarray, spacing_mm: float, mask: np.ndarray, margin: int = 0) -> tuple[float, float]:
    """Full-dose photons per ray giving :data:`FULL_DOSE_NOISE_HU` of quantum noise over ``mask`` at 1024 views.

    One noise-only FBP at :data:`CALIBRATION_VIEWS` views and :data:`CALIBRATION_I0` photons (fixed seed), scaled
    by noise variance ∝ 1 / (views · I0), which holds in the high-count regime used here.

    Returns:
        ``(i0, noise_hu_at_3e6)``: the calibrated I0 and the 1024-view noise std (HU) that ``I0 = 3e6`` gives.
    """
    idx = view_indices(CALIBRATION_VIEWS)
    p = sinogram[:, idx]
    rng = np.random.default_rng(CALIBRATION_SEED)
    noise = noisy_line_integrals(p, CALIBRATION_I0, rng) - p
    recon = _recon(noise, full_view_angles()[idx], spacing_mm, mask.shape[0], margin, np.nonzero(mask))
    sigma = float(mu_to_hu_difference(recon).std())
    sigma_full = sigma * math.sqrt(CALIBRATION_VIEWS / N_FULL_VIEWS)  # at CALIBRATION_I0, 1024 views
    i0 = CALIBRATION_I0 * (sigma_full / FULL_DOSE_NOISE_HU) ** 2
    return i0, sigma_full * math.sqrt(CALIBRATION_I0 / 3e6)


def degrade(
    proj: Projections,
    dose_fraction: float,
    n_views: int,
    rng: np.random.Generator,
    pixels: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The HU added by one degradation level: ``FBP_n(noisy p) - FBP_1024(p)`` (noise + sparse-view streaks).

    Args:
        proj: the base slice's :class:`Projections`.
        dose_fraction: per-view dose fraction d in (0, 1] (counts ``proj.i0 · d`` per ray).
        n_views: views kept (evenly spread) out of 1024.
        rng: the level's random generator (Poisson draws).
        pixels: ``(rows, cols)`` index arrays to compute (see :func:`fbp`); ``None``: the whole slice.

    Returns:
        float64 HU to add to ``proj.hu``: (N, N), or the broadcast shape of ``rows`` and ``cols``.
    """
    if not 0 < dose_fraction <= 1:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose_fraction}")
    idx = view_indices(n_views)
    noisy = noisy_line_integrals(proj.sinogram[:, idx], proj.i0 * dose_fraction, rng)
    deg = proj.recon(noisy, full_view_angles()[idx], pixels)
    ref = proj.reference if pixels is None else proj.reference[pixels]
    return mu_to_hu_difference(deg - ref)


# --------------------------------------------------------------------------------------------------------------
# Base slices: finding, reading, projecting (cached)
# --------------------------------------------------------------------------------------------------------------


def base_slice_path(bs: BaseSlice) -> Path | None:
    """Local path of a base slice's file, or ``None`` when its package (pydicom-data) is not installed.

    Never downloads (``download=False``).
    """
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = get_testdata_file(bs.filename, download=False)
    return Path(p) if p else None


def pixel_spacing_mm(path: Path) -> float:
    """Row/column pixel spacing (mm) of a DICOM file (Pixel Spacing, or the enhanced-CT Pixel Measures).

    Raises:
        CTIQAError: missing, or not square (the projector assumes square pixels).
    """
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        for group in ds.get("SharedFunctionalGroupsSequence", []) or []:
            measures = group.get("PixelMeasuresSequence")
            if measures:
                spacing = measures[0].get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        raise CTIQAError(f"{path}: no Pixel Spacing; the simulation needs the pixel size in mm")
    row, col = float(spacing[0]), float(spacing[1])
    if row <= 0 or abs(row - col) > 0.01 * row:
        raise CTIQAError(f"{path}: pixel spacing {row} x {col} mm is not square; the simulation needs square pixels")
    return row


def _slice_pixels(path: Path) -> int:
    """The smaller of Rows / Columns of a DICOM file (header only)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return min(int(ds.Rows), int(ds.Columns))


def read_base_slice(bs: BaseSlice, path: Path) -> tuple[np.ndarray, float]:
    """HU of a base slice via :func:`ctiqa.imaging.read_ct` and its pixel spacing.

    Returns:
        ``(hu, spacing_mm)``: float32 (N, N) HU, spacing in mm.

    Raises:
        CTIQAError: not HU, not square.
    """
    img = read_ct(path, frame=bs.frame)
    if img.kind != "hu":
        raise CTIQAError(f"{path}: base slice must be CT in HU, read as {img.kind!r}")
    if img.pixels.shape[0] != img.pixels.shape[1]:
        raise CTIQAError(f"{path}: base slice must be square, got {img.pixels.shape}")
    return img.pixels, pixel_spacing_mm(path)


def default_cache_dir() -> Path:
    """``sinograms/`` in the ctiqa cache folder (:func:`ctiqa.paths.cache_home`; ``$CTIQA_CACHE_DIR`` moves it)."""
    from ctiqa.paths import cache_path

    return cache_path("sinograms")


def _cache_key(bs: BaseSlice, path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(repr((bs.frame, N_FULL_VIEWS, FBP_FILTER, MU_WATER_PER_MM, FULL_DOSE_NOISE_HU, CALIBRATION_VIEWS,
                   CALIBRATION_I0, CALIBRATION_SEED, TRUNCATION_BORDER_FRACTION, TRUNCATION_MARGIN_DIVISOR,
                   PHYSICS_VERSION)).encode())
    return f"{bs.name}-{h.hexdigest()[:20]}.npz"


_MEMORY_CACHE: dict[str, Projections] = {}


def project_base_slice(bs: BaseSlice, path: Path, cache_dir: Path | None = None) -> Projections:
    """Read, forward-project, reconstruct the reference and calibrate I0 for one base slice.

    Cached in memory (per process) and, when ``cache_dir`` is given, on disk as ``<name>-<hash>.npz`` keyed by
    the file's bytes and the physics constants (a stale or unreadable cache file is recomputed).

    Returns:
        :class:`Projections`.
    """
    key = _cache_key(bs, path)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    hu, spacing = read_base_slice(bs, path)
    cached = cache_dir / key if cache_dir is not None else None
    proj = None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as z:
                proj = Projections(bs.name, hu, spacing, z["sinogram"], z["reference"], float(z["i0"]),
                                   float(z["i0_fixed_noise_hu"]), int(z["margin"]))
        except Exception:  # damaged cache file: recompute
            proj = None
    if proj is None:
        mu, margin = attenuation_map(hu)
        sino = forward_project(mu, spacing)
        ref = _recon(sino, full_view_angles(), spacing, hu.shape[0], margin, None)
        i0, fixed = calibrate_i0(sino, spacing, soft_tissue_mask(hu), margin)
        proj = Projections(bs.name, hu, spacing, sino, ref, i0, fixed, margin)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, sinogram=sino, reference=ref, i0=i0, i0_fixed_noise_hu=fixed, margin=margin)
            os.replace(tmp, cached)
    _MEMORY_CACHE[key] = proj
    return proj


# --------------------------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------------------------


def tissue_fraction_map(hu: np.ndarray, size: int) -> np.ndarray:
    """Fraction of soft-tissue-window pixels in every ``size`` × ``size`` crop; element [y, x] = crop at (y, x).

    Returns:
        float64 (N - size + 1, N - size + 1).
    """
    ii = np.pad(soft_tissue_mask(hu).astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    s = size
    return (ii[s:, s:] - ii[:-s, s:] - ii[s:, :-s] + ii[:-s, :-s]) / float(s * s)


def crops_per_level(hu: np.ndarray, size: int) -> int:
    """How many crops to cut from one reconstructed level: 1 for a whole slice, else the slice's soft-tissue area
    in crop areas, clamped to [1, :data:`MAX_CROPS_PER_LEVEL`]."""
    if size >= hu.shape[0]:
        return 1
    return int(min(MAX_CROPS_PER_LEVEL, max(1, soft_tissue_mask(hu).sum() // (size * size))))


def choose_crops(valid: np.ndarray, size: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Seeded crop positions (y, x) among ``valid`` (K, 2) positions, overlapping by <= :data:`MAX_CROP_OVERLAP`
    where possible (then any valid position, so exactly ``count`` are returned)."""
    order = rng.permutation(len(valid))
    chosen: list[tuple[int, int]] = []
    for i in order[:4000]:
        y, x = (int(v) for v in valid[i])
        if all(max(0, size - abs(y - cy)) * max(0, size - abs(x - cx)) <= MAX_CROP_OVERLAP * size * size
               for cy, cx in chosen):
            chosen.append((y, x))
            if len(chosen) == count:
                return chosen
    for i in order:
        if len(chosen) == count:
            break
        y, x = (int(v) for v in valid[i])
        if (y, x) not in chosen:
            chosen.append((y, x))
    while len(chosen) < count:  # fewer distinct positions than crops (tiny slices): repeat
        chosen.append(chosen[len(chosen) % max(1, len(chosen))])
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Level:
    slice_index: int
    level: int
    dose: float
    n_views: int
    crops: list[tuple[int, int]]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _plan(projs: list[Projections], slice_ids: list[int], counts: list[int], size: int, seed: int) -> list[_Level]:
    """Degradation levels and crop positions for every base slice (deterministic for a seed)."""
    levels: list[_Level] = []
    for proj, sid, n in zip(projs, slice_ids, counts, strict=True):
        if n == 0:
            continue
        rng = _rng(seed, sid, 0)
        per = crops_per_level(proj.hu, size)
        n_levels = math.ceil(n / per)
        if size >= proj.hu.shape[0]:
            valid = np.zeros((1, 2), dtype=np.int64)
        else:
            valid = np.argwhere(tissue_fraction_map(proj.hu, size) >= MIN_TISSUE_FRACTION)
        targets = (np.arange(n_levels) + rng.random(n_levels)) / n_levels * SCORE_MAX  # stratified over [0, 4]
        rng.shuffle(targets)
        for j in range(n_levels):
            dose, views = level_for_score(float(targets[j]), float(rng.random()))
            k = min(per, n - j * per)
            levels.append(_Level(sid, j, dose, views, choose_crops(valid, size, k, rng)))
    return levels


# worker-side state (set by _init_worker in each process; in the main process when workers == 1)
_SHARED: dict[int, Projections] = {}


def _init_worker(shared: dict[int, Projections]) -> None:
    _SHARED.clear()
    _SHARED.update(shared)


def _project_task(args: tuple[int, str | None]) -> tuple[int, Projections]:
    sid, cache = args
    bs = BASE_SLICES[sid]
    path = base_slice_path(bs)
    assert path is not None
    return sid, project_base_slice(bs, path, Path(cache) if cache else None)


def _level_task(args: tuple[_Level, int, int]) -> list[tuple[np.ndarray, float]]:
    """Reconstruct one level at its crops only: [(float32 unit crop, added-HU std over soft tissue)]."""
    lv, size, seed = args
    proj = _SHARED[lv.slice_index]
    grid = np.arange(size)
    rows = np.stack([y + grid for y, _ in lv.crops])[:, :, None]  # (k, size, 1)
    cols = np.stack([x + grid for _, x in lv.crops])[:, None, :]  # (k, 1, size)
    added = degrade(proj, lv.dose, lv.n_views, _rng(seed, lv.slice_index, 1, lv.level), pixels=(rows, cols))
    out = []
    for (y, x), add in zip(lv.crops, added, strict=True):
        orig = proj.hu[y:y + size, x:x + size].astype(np.float64)
        mask = soft_tissue_mask(orig)
        std = float(add[mask].std()) if mask.sum() > 1 else float(add.std())
        out.append((hu_to_unit(orig + add), std))
    return out


def _parallel(fn, tasks: list, workers: int, desc: str, shared: dict | None = None, progress: bool = True):
    """Yield ``fn(task)`` in task order, in ``workers`` processes (or in this one), with a tqdm bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not progress, file=sys.stderr)
    try:
        if workers <= 1 or len(tasks) <= 1:
            if shared is not None:
                _init_worker(shared)
            for t in tasks:
                yield fn(t)
                bar.update()
        else:
            init = (_init_worker, (shared,)) if shared is not None else (None, ())
            with ProcessPoolExecutor(min(workers, len(tasks)), initializer=init[0], initargs=init[1]) as ex:
                for r in ex.map(fn, tasks):
                    yield r
                    bar.update()
    finally:
        bar.close()


def resolve_base_slices(names: list[str] | None, size: int) -> tuple[list[int], list[str]]:
    """Indices into :data:`BASE_SLICES` usable at ``size`` (file present, slice >= size), and skip messages.

    Raises:
        CTIQAError: an unknown name.
    """
    known = {bs.name: i for i, bs in enumerate(BASE_SLICES)}
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise CTIQAError(f"unknown base slice(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    wanted = [known[n] for n in names] if names is not None else list(range(len(BASE_SLICES)))
    usable, skipped = [], []
    for i in sorted(set(wanted)):
        bs = BASE_SLICES[i]
        path = base_slice_path(bs)
        if path is None:
            skipped.append(f"{bs.name}: {bs.filename} not found (install pydicom-data for the 512x512 slices)")
            continue
        n = _slice_pixels(path)
        if n < size:
            skipped.append(f"{bs.name}: {n}x{n} slice is smaller than --size {size} (crops are never upsampled)")
            continue
        usable.append(i)
    return usable, skipped


def simulate(
    out: str | os.PathLike,
    n_images: int = 100,
    size: int = 512,
    seed: int = 0,
    test_base_slices: list[str] | tuple[str, ...] | None = DEFAULT_TEST_BASE_SLICES,
    base_slices: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a mini-LDCTIQA to ``out`` (see the module docstring) and return its ``degradations.json`` content.

    Args:
        out: output folder; created, or a previous ``ctiqa simulate`` output: made with the same settings (or
            interrupted before its ``degradations.json``), it is written again (the same images); made with other
            settings, it is refused (:func:`check_previous_simulation`). Any other non-empty folder is refused.
        n_images: number of images (>= 1), shared evenly among the usable base slices.
        size: crop size in pixels (>= 16); 512 gives whole slices like LDCTIQA.
        seed: all random choices (levels, crop positions, Poisson noise) follow from it.
        test_base_slices: base-slice names recorded as held out for the test split (must be used ones).
        base_slices: restrict to these base-slice names (default: all available at ``size``).
        cache_dir: on-disk sinogram cache (``None``: memory only).
        workers: processes (1: this process). The result does not depend on it.
        progress: show tqdm bars and stage times (stdout).
        overwrite: a previous simulation with other settings in ``out`` is moved aside (``NAME.<UTC time>.bak``),
            never deleted, and a new one written.

    Returns:
        dict as written to ``degradations.json``.

    Raises:
        CTIQAError: bad arguments, no usable base slice, every usable slice held out, ``out`` not ours, ``out``
            holds a simulation with other settings (without ``overwrite``).
    """
    import tifffile

    out = Path(out)
    if n_images < 1:
        raise CTIQAError(f"--n-images must be >= 1, got {n_images}")
    if size < 16:
        raise CTIQAError(f"--size must be >= 16 pixels, got {size}")
    deg_file = out / DEGRADATIONS_FILE
    check_output_path(out, folder=True, ours=_is_our_output,
                      hint="It is not a ctiqa simulation output; choose an empty or new --out")
    usable, skipped = resolve_base_slices(base_slices, size)
    say = print if progress else (lambda *a, **k: None)
    for msg in skipped:
        say(f"[simulate] skipping base slice {msg}")
    if not usable:
        raise CTIQAError(f"no base slice is usable at --size {size} (largest: 512 with pydicom-data, else 128)")
    names = [BASE_SLICES[i].name for i in usable]
    held = list(dict.fromkeys(test_base_slices or []))
    unknown = [h for h in held if h not in {bs.name for bs in BASE_SLICES}]
    if unknown:
        raise CTIQAError(f"unknown test base slice(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    missing = [h for h in held if h not in names]
    for h in missing:
        say(f"[simulate] warning: test base slice {h!r} is not used at this size/installation; not held out")
    held = [h for h in held if h in names]
    if held and len(held) == len(names):
        raise CTIQAError(f"every usable base slice ({', '.join(names)}) is held out for testing; nothing to train on")
    counts = [n_images // len(usable) + (1 if k < n_images % len(usable) else 0) for k in range(len(usable))]
    check_previous_simulation(out, {"n_images": n_images, "size": size, "seed": seed, "base_slices": names,
                                    "test_base_slices": [h for h in held if counts[names.index(h)]],
                                    "physics": PHYSICS_VERSION}, overwrite)

    # --- stage 1: sinograms, reference recon, calibration (cached) -----------------------------------------
    t0 = time.perf_counter()
    cache = str(cache_dir) if cache_dir is not None else None
    projs_by_id = dict(_parallel(_project_task, [(i, cache) for i in usable], workers, "sinograms",
                                 progress=progress))
    projs = [projs_by_id[i] for i in usable]
    for p in projs:
        if p.hu.shape[0] < size:
            raise CTIQAError(f"base slice {p.name}: {p.hu.shape[0]} px is smaller than --size {size}")
    say(f"[simulate] sinograms + reference + calibration: {len(projs)} base slices in {time.perf_counter() - t0:.1f} s")

    # --- stage 2: levels -> crops ----------------------------------------------------------------------------
    t1 = time.perf_counter()
    empty = [h for h in held if counts[names.index(h)] == 0]
    for h in empty:
        say(f"[simulate] warning: test base slice {h!r} gets no image with --n-images {n_images}; not held out")
    held = [h for h in held if h not in empty]
    levels = _plan(projs, usable, counts, size, seed)
    order = sorted(range(len(levels)), key=lambda k: -levels[k].n_views)  # big jobs first (load balance)
    ids = _rng(seed, 99).permutation(n_images)  # image ids shuffled so they reveal neither slice nor score
    if out.exists():
        _clear_previous(out)
    (out / "image").mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text(f"written by ctiqa.simulation (ctiqa {__version__}); synthetic data\n")
    records: dict[str, dict[str, Any]] = {}
    starts = np.cumsum([0] + [len(lv.crops) for lv in levels])
    results = _parallel(_level_task, [(levels[k], size, seed) for k in order], workers, "levels",
                        shared={i: p for i, p in zip(usable, projs, strict=True)}, progress=progress)
    for k, crops in zip(order, results, strict=True):
        lv = levels[k]
        score = round(synthetic_score(lv.dose, lv.n_views), 1)
        for c, ((y, x), (img, std)) in enumerate(zip(lv.crops, crops, strict=True)):
            fname = f"{int(ids[starts[k] + c]):04d}.tif"
            tifffile.imwrite(out / "image" / fname, img.astype(np.float32, copy=False))
            records[fname] = {
                "base_slice": BASE_SLICES[lv.slice_index].name, "source_file": BASE_SLICES[lv.slice_index].filename,
                "frame": BASE_SLICES[lv.slice_index].frame, "level": lv.level, "dose_fraction": lv.dose,
                "n_views": lv.n_views, "relative_total_dose": round(lv.dose * lv.n_views / N_FULL_VIEWS, 5),
                "score": score, "crop": [y, x, size], "added_noise_hu": round(std, 2),
                "noise_sigma_hu": round(expected_noise_hu(lv.dose, lv.n_views), 2), "synthetic": True,
            }
    records = dict(sorted(records.items()))
    say(f"[simulate] {len(levels)} reconstructions -> {len(records)} images of {size}x{size} px "
        f"in {time.perf_counter() - t1:.1f} s")

    deg = {
        "synthetic": True,
        "note": SYNTHETIC_NOTE,
        "test_base_slices": held,
        "generator": f"ctiqa {__version__} ctiqa.simulation (physics v{PHYSICS_VERSION})",
        "seed": seed, "size": size, "n_images": len(records),
        "score_formula": "score = clip(4 * (1 - 0.4*log10(1/dose_fraction) - 0.6*log16(1024/n_views)), 0, 4), "
                         "rounded to 0.1 (synthetic, not radiologist ratings)",
        "pixel_values": "float32 [0, 1] = clip((HU + 135) / 350, 0, 1): soft-tissue window W350/L40 (LDCTIQA)",
        "physics": {
            "mu_water_per_mm": MU_WATER_PER_MM, "n_full_views": N_FULL_VIEWS, "geometry": "parallel beam, 180 deg",
            "fbp_filter": FBP_FILTER, "full_dose_noise_hu": FULL_DOSE_NOISE_HU,
            "noise": "Poisson on transmitted counts I0*dose*exp(-p); output = original + FBP_n(noisy) - FBP_1024(p)",
            "dose_range": list(DOSE_RANGE), "views_range": list(VIEWS_RANGE),
        },
        "base_slices": {
            p.name: {
                "file": BASE_SLICES[i].filename, "frame": BASE_SLICES[i].frame, "anatomy": BASE_SLICES[i].anatomy,
                "pixels": p.hu.shape[0], "pixel_spacing_mm": round(p.spacing_mm, 4),
                "i0_full_dose": float(f"{p.i0:.4g}"), "noise_hu_at_i0_3e6": round(p.i0_fixed_noise_hu, 2),
                "n_images": c, "held_out": p.name in held,
            }
            for i, p, c in zip(usable, projs, counts, strict=True)
        },
        "images": records,
    }
    (out / "train.json").write_text(json.dumps({k: v["score"] for k, v in records.items()}, indent=1))
    (out / "README.txt").write_text(_readme(deg))
    with atomic_write(deg_file) as f:  # written last: its presence marks a complete simulation
        f.write(json.dumps(deg, indent=1))
    return deg


def _is_our_output(out: Path) -> bool:
    """A folder written (completely or partly) by :func:`simulate`: its marker file or its degradations.json."""
    if (out / MARKER_FILE).is_file():
        return True
    try:
        d = json.loads((out / DEGRADATIONS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("synthetic") is True and "ctiqa.simulation" in str(d.get("generator", ""))


#: The settings a simulation is made from, as ``check_previous_simulation`` names them (CLI options).
_SETTING_NAMES = {"n_images": "--n-images", "size": "--size", "seed": "--seed", "base_slices": "--base-slices",
                  "test_base_slices": "--test-base-slices", "physics": "physics version"}
#: What :func:`simulate` writes in its output folder (besides :data:`MARKER_FILE`).
_WRITTEN = ("image", "train.json", DEGRADATIONS_FILE, "README.txt")


def check_previous_simulation(out: Path, settings: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse, before any work, an ``out`` that holds a finished simulation made with other settings: its
    ``degradations.json`` records other ``n_images``, ``size``, ``seed``, base slices, held-out test slices or
    physics version than ``settings`` (keys of :data:`_SETTING_NAMES`; base slices as used, test slices as held
    out). The same settings, no simulation, or one interrupted before its ``degradations.json``: nothing to do
    (:func:`simulate` writes it again). With ``overwrite`` the previous simulation's ``image/``, ``train.json``,
    ``degradations.json`` and ``README.txt`` are moved aside (``NAME.<UTC time>.bak[.EXT]``, said on stderr), never
    deleted.

    Raises:
        CTIQAError: other settings and no ``overwrite``; the message names each setting that differs.
    """
    try:
        deg = json.loads((out / DEGRADATIONS_FILE).read_text())
        if not (isinstance(deg, dict) and _is_our_output(out)):
            return
        physics = next(iter(re.findall(r"physics v(\w+)", str(deg.get("generator", "")))), None)
        before = {"n_images": deg.get("n_images"), "size": deg.get("size"), "seed": deg.get("seed"),
                  "base_slices": list(deg.get("base_slices") or {}), "test_base_slices": deg.get("test_base_slices"),
                  "physics": physics}
    except (OSError, ValueError):
        return
    def fmt(v: Any) -> str:
        return (" ".join(map(str, v)) or "none") if isinstance(v, list) else str(v)

    diff = [f"{name} {fmt(before[k])} then, {fmt(settings[k])} now" for k, name in _SETTING_NAMES.items()
            if before[k] != settings[k]]
    if not diff:
        return
    if not overwrite:
        raise CTIQAError(f"--out {out}: holds a simulation made with other settings ({'; '.join(diff)}); nothing was "
                         "changed. Give another --out, or --overwrite to move its image/, train.json, "
                         "degradations.json and README.txt aside")
    move_aside([out / name for name in _WRITTEN], "simulation")


def _clear_previous(out: Path) -> None:
    """Remove a previous simulation's files (only the ones it writes)."""
    for name in (DEGRADATIONS_FILE, DEGRADATIONS_FILE + ".tmp", "train.json", "README.txt"):
        (out / name).unlink(missing_ok=True)
    img = out / "image"
    if img.is_dir():
        for f in img.glob("[0-9][0-9][0-9][0-9].tif"):
            f.unlink()


def _readme(deg: dict[str, Any]) -> str:
    slices = "\n".join(
        f"  {n}{' (HELD OUT for test)' if b['held_out'] else ''}: {b['file']}, {b['anatomy']}, "
        f"{b['pixel_spacing_mm']} mm pixels, I0 {b['i0_full_dose']:.3g}, {b['n_images']} images"
        for n, b in deg["base_slices"].items()
    )
    return (
        "SYNTHETIC mini-LDCTIQA written by `ctiqa simulate` (ctiqa.simulation).\n\n"
        f"{SYNTHETIC_NOTE}\n\n"
        "Layout (LDCTIQA 2023 training release): image/NNNN.tif (float32, [0, 1] = soft-tissue window W350/L40),\n"
        "train.json (file -> score), degradations.json (synthetic: true, how each image was made).\n\n"
        f"Score: {deg['score_formula']}\n"
        f"Images: {deg['n_images']} of {deg['size']}x{deg['size']} px, seed {deg['seed']}; crops at native "
        "resolution.\n"
        f"Test base slices (never in training with the 'base-slice' split): {', '.join(deg['test_base_slices']) or 'none'}\n"
        f"Base slices:\n{slices}\n\n"
        "Physics: HU -> mu = 0.0192/mm (1 + HU/1000); parallel-beam radon at 1024 views; Poisson counts at\n"
        "I0 * dose per ray on every k-th view; -log; ramp-filter FBP; output = original + (degraded recon -\n"
        "noiseless 1024-view recon), so noise and sparse-view streaks are added at the original resolution.\n"
        f"I0 per slice gives {FULL_DOSE_NOISE_HU} HU of added noise at full dose (1.0, 1024 views).\n"
        "Source CT: pydicom / pydicom-data test files (see their licences). No patient or study metadata is copied;\n"
        "only the pixel spacing (a physical input of the simulation) is recorded.\n"
    )


# --------------------------------------------------------------------------------------------------------------
# CLI: ctiqa simulate --out DIR
# --------------------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ctiqa simulate``."""
    from ctiqa.cli import non_negative_int

    parser.add_argument("--out", required=True, help="output folder (LDCTIQA layout)")
    parser.add_argument("--n-images", type=int, default=100, help="number of images (default 100)")
    parser.add_argument("--size", type=int, default=512,
                        help="image size in px; smaller than a slice -> crops at native resolution (default 512)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--test-base-slices", nargs="*", default=list(DEFAULT_TEST_BASE_SLICES), metavar="NAME",
                        help="base slices held out for the test split (default: abdomen; none: give the flag alone)")
    parser.add_argument("--base-slices", nargs="+", default=None, metavar="NAME",
                        help=f"use only these base slices ({', '.join(bs.name for bs in BASE_SLICES)})")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: CPU cores, at most 4); results do not depend on it")
    parser.add_argument("--cache-dir", default=None,
                        help=f"sinogram cache (default {default_cache_dir()}; $CTIQA_CACHE_DIR moves it)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk sinogram cache")
    parser.add_argument("--overwrite", action="store_true", help="--out holds a simulation made with other settings: "
                        "move its image/, train.json, degradations.json and README.txt aside (.bak) and start over "
                        "(without it such a run is refused; the same settings re-run without it)")


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa simulate``: write the mini-LDCTIQA and print a summary. Returns 0."""
    workers = args.workers if args.workers is not None else min(4, len(os.sched_getaffinity(0)))
    cache = None if args.no_cache else (Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    if cache is not None:  # before minutes of projections, not after
        if cache.exists() and not cache.is_dir():
            raise CTIQAError(f"--cache-dir {cache}: is a file; give a folder for the sinogram cache")
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CTIQAError(f"--cache-dir {cache}: cannot be used as a folder ({e.strerror or e})") from e
    t0 = time.perf_counter()
    deg = simulate(args.out, n_images=args.n_images, size=args.size, seed=args.seed,
                   test_base_slices=args.test_base_slices, base_slices=args.base_slices, cache_dir=cache,
                   workers=max(1, workers), overwrite=args.overwrite)
    scores = [r["score"] for r in deg["images"].values()]
    print(f"[simulate] wrote {len(scores)} SYNTHETIC images to {args.out} in {time.perf_counter() - t0:.1f} s; "
          f"scores {min(scores):.1f}..{max(scores):.1f} ({len(set(scores))} distinct); "
          f"held out: {', '.join(deg['test_base_slices']) or 'none'}")
    return 0
