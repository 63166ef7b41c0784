"""CT imaging: read a CT file, find out what its numbers mean, window it, and render the RGB image the VLM sees.

This is the ONE pixel path of ctiqa: the dataset builder, training, evaluation and ``ctiqa predict`` all call
:func:`render` (or :func:`read_ct` + :func:`render`), so the model sees the same pixels everywhere.

What the numbers mean (:attr:`CTImage.kind`)
--------------------------------------------
``"hu"``
    Hounsfield units (air -1000, water 0, soft tissue ~0..100, bone > 300).
``"unit"``
    LDCTIQA 2023 convention: HU already windowed to soft tissue (level 40, width 350) and scaled to [0, 1]
    (dataset documentation, Zenodo 7833096; design.md §3). NOT Hounsfield units; the inverse
    ``HU ≈ -135 + 350·x`` is only valid inside the window, so only one window can be rebuilt from it.
``"display"``
    An 8-bit grey display image (PNG/JPEG, uint8 TIFF, 8-bit secondary-capture DICOM), values 0..255.

How the kind is detected (explicit rules; nothing is clipped silently)
----------------------------------------------------------------------
* DICOM: the modality LUT is applied (per-frame Pixel Value Transformation of enhanced CT first, then the
  top-level Rescale Slope/Intercept or Modality LUT Sequence via :func:`pydicom.pixels.apply_modality_lut`) in
  float64, so uint16 storage with intercept -1024 never overflows; Pixel Padding Value pixels become air
  (:data:`AIR_HU`); axis-aligned axial slices stored flipped are flipped to the standard display orientation.
  Window Center/Width in the file are ignored (ctiqa applies its own, recorded windows). Modality CT -> ``"hu"``; an 8-bit secondary capture
  (Modality OT or missing) without rescale -> ``"display"`` (MONOCHROME1 inverted); anything else is refused
  (MR, US, NM, ..., and 1-bit segmentations/overlays, whatever their modality).
  Colour DICOM (RGB/YBR/palette: secondary captures, screenshots) is refused: it holds no CT values.
  A CT without Rescale Slope/Intercept (Type 1 in the CT Image module, DICOM PS3.3 C.8.2.1, so the file is
  non-conformant) is decided from its stored values (padding excluded; ``p_lo``/``p_hi`` = 0.5th/99.5th
  percentiles): clearly negative values (``p_lo < -50``) are HU stored directly (the standard's identity
  default; read silently); values that only fit the usual CT storage offset (``-50 <= p_lo <= 200``, i.e. air
  at the dark end, and ``p_hi >= 824``, i.e. tissue once shifted) are read with intercept -1024 and a
  :class:`ctiqa.CTIQAWarning`; anything else is refused (air would land at 0 HU or the image would be all air).
  A file whose pixel data holds more (or fewer) frames than Number of Frames is refused.
* TIFF (read with tifffile, never PIL) and PNG/JPEG (PIL, only for 8/16-bit integer data); every page of a
  multi-page TIFF is a slice, pages of different sizes or appended one by one included:
  - float data with all values in [-0.001, 1.001] -> ``"unit"`` (LDCTIQA);
  - float data in [-0.25, 1.25] (:data:`UNIT_OVERSHOOT`: denoiser output, resampling overshoot) -> ``"unit"``,
    clipped to [0, 1] with a :class:`ctiqa.CTIQAWarning` giving the clipped fraction (clipping is what the
    soft-tissue window does to those values anyway);
  - other float data within [-2, 2] -> refused (normalised by another convention, e.g. [-1, 1]; not HU);
  - float data outside that, within :data:`PLAUSIBLE_HU` -> ``"hu"`` (a float image in 0..255 is therefore read
    as HU: export such images as 8-bit instead);
  - signed integers (int8/16/32) -> ``"hu"`` (HU stored directly);
  - float or signed-integer "HU" whose values only fit the usual +1024 storage offset (the rule of a CT DICOM
    without Rescale Intercept above: no value below -50 in the darkest 0.5 %, the brightest 0.5 % above 824) ->
    HU = value - 1024 with a :class:`ctiqa.CTIQAWarning` (read as HU, its air would sit at about +24 HU);
  - uint8 -> ``"display"``;
  - uint16 with maximum <= 4095 -> ``"hu"`` with HU = value - 1024: unsigned storage cannot hold air's -1000,
    so 12-bit unsigned CT is stored with the +1024 offset that the DICOM default Rescale Intercept -1024 undoes;
    uint16 with larger values is refused (ambiguous: 16-bit display image or another offset);
  - RGB(A) 8-bit -> converted to grey by ITU-R BT.601 luminance 0.299 R + 0.587 G + 0.114 B (float, no
    rounding), ``"display"``;
  - NaN/inf, other dtypes, more than one channel in non-8-bit data -> :class:`ctiqa.CTIQAError`.
* Every file: each side at least :data:`MIN_IMAGE_SIZE` pixels, else :class:`ctiqa.CTIQAError`.

Anything assumed or adjusted while reading is kept in :attr:`CTImage.notes` and issued as a
:class:`ctiqa.CTIQAWarning` naming the file. Images that reach the model without :func:`render` (the Python API,
hand-built datasets) are checked by :func:`check_model_image`.

Rendering (:func:`render`)
--------------------------
Every window maps HU linearly: ``v = 255 · (HU - (L - W/2)) / W``, clipped to [0, 255], rounded half up
(``floor(v + 0.5)``), uint8. The encoding is a named, recorded choice (:data:`ENCODINGS`,
:func:`encoding_info`).

Privacy: no DICOM metadata is kept; :class:`CTImage` holds pixels, the kind, the file path and the slice
position (mm) used to order a series.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctiqa import CTIQAError, CTIQAWarning
from ctiqa.paths import atomic_write, check_output_path

# --------------------------------------------------------------------------------------------------------------
# Constants (each with its source)
# --------------------------------------------------------------------------------------------------------------

#: Soft-tissue window (level, width) in HU: W350/L40, the LDCTIQA 2023 preprocessing (dataset documentation,
#: Zenodo 7833096; Lee et al., MedIA 2025) and a standard abdominal soft-tissue window.
SOFT_TISSUE: tuple[float, float] = (40.0, 350.0)

#: Google's MedGemma CT convention (MedGemma 1.5 notebooks, maintainers' answers; design.md §3): three HU
#: windows as R, G, B, each (level, width): R -1024..1024, G -135..215, B 0..80 HU.
MEDGEMMA_3WINDOW: tuple[tuple[float, float], ...] = ((0.0, 2048.0), (40.0, 350.0), (40.0, 80.0))

#: Named RGB encodings accepted by :func:`render`.
ENCODINGS: tuple[str, ...] = ("soft-tissue", "medgemma-3window")
#: The encoding used when none is named or recorded with the model.
DEFAULT_ENCODING = ENCODINGS[0]

#: Values a float/signed image must lie in to be taken as HU (HU; -3024 is a common scanner padding value,
#: +32767 the top of the extended CT scale). Outside -> CTIQAError.
PLAUSIBLE_HU: tuple[float, float] = (-3100.0, 32767.0)

#: Tolerance around [0, 1] for LDCTIQA-style float images (float rounding of the normalisation): clipped silently.
UNIT_TOLERANCE = 1e-3

#: Overshoot around [0, 1] still read as window-normalised data (denoiser output, resampling overshoot of
#: -0.1..1.1 seen in practice): a quarter of the window (87.5 HU past each edge of W350/L40). Values outside
#: [0, 1] are clipped and counted (:class:`ctiqa.CTIQAWarning`). Float data within ±2 beyond this is refused:
#: no CT slice in HU fits in ±2 HU (air is -1000), so it is normalised data of an unknown convention.
UNIT_OVERSHOOT = 0.25
NORMALISED_LIMIT = 2.0

#: Offset of 12-bit unsigned CT storage (uint16 TIFF/PNG, max <= 4095; CT DICOM without a Rescale Intercept whose
#: values fit it): HU = value + UINT16_HU_INTERCEPT. Source: the Rescale Intercept -1024 that CT scanners write
#: for unsigned storage (air -1000 HU stored as 24), e.g. pydicom's CT_small.dcm and bad_sequence.dcm.
UINT16_HU_INTERCEPT = -1024.0
UINT16_MAX_CT_VALUE = 4095

#: Stored-value thresholds deciding a CT DICOM without Rescale Slope/Intercept (module docstring): 0.5th percentile
#: below -50 -> HU stored directly (air/fat present as negative numbers, beyond noise around 0); 0.5th percentile
#: in [-50, 200] and 99.5th percentile >= 824 -> the -1024 storage offset (air stored near 24, tissue above
#: -200 HU once shifted).
NO_RESCALE_NEGATIVE = -50.0
NO_RESCALE_AIR_MAX = 200.0
NO_RESCALE_TISSUE_MIN = 824.0

#: Smallest image side (pixels) ctiqa reads or feeds the model. A floor against 1×1 images, icons and one-line
#: "images" (usually a mis-read): below it there is no texture to grade and the processor's resize to 896 px
#: (MedGemma/SigLIP) magnifies by > 50×. Real CT slices are 512 px; ctiqa simulate crops default to 128 px.
MIN_IMAGE_SIZE = 16

#: HU given to DICOM padding pixels (Pixel Padding Value, outside the field of view): air. Padding is often
#: -2000/-3024 HU or raw -32768; mapping it to air keeps every window unchanged (black) and the HU plausible.
AIR_HU = -1024.0

#: ITU-R BT.601 luma weights used to turn an RGB display image into grey.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

KINDS = ("hu", "unit", "display")
_TIFF_SUFFIXES = {".tif", ".tiff"}
_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
#: File suffixes (lower case) of the non-DICOM images ctiqa reads: TIFF and 8/16-bit raster images.
IMAGE_SUFFIXES = frozenset(_TIFF_SUFFIXES | _RASTER_SUFFIXES)


@dataclass
class CTImage:
    """One CT slice as read from disk.

    Attributes:
        pixels: float32 array (H, W). Units depend on ``kind``: HU, [0, 1] soft-tissue-windowed, or 0..255 grey.
        kind: ``"hu"`` | ``"unit"`` | ``"display"`` (see the module docstring for the detection rules).
        source: the file it came from (path string; with ``#N`` appended for frame N of a multi-frame file).
        position: slice position in mm along the slice normal (DICOM Image Position (Patient) · normal), used
            only to order a series; ``None`` when unknown.
        notes: what was assumed or adjusted while reading (e.g. ``"... 3.1 % of pixels outside [0, 1] clipped"``),
            each also issued as a :class:`ctiqa.CTIQAWarning`; empty when the file was read as it is.

    DICOM axial slices stored flipped (Image Orientation (Patient) with row direction -x or column direction -y)
    are flipped into the standard display orientation on reading (see ``_standard_axial``); TIFF/PNG pixels are
    kept as stored.
    """

    pixels: np.ndarray
    kind: str
    source: str
    position: float | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self.pixels = np.asarray(self.pixels, dtype=np.float32)
        if self.pixels.ndim != 2:
            raise ValueError(f"pixels must be 2-D (H, W), got shape {self.pixels.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return self.pixels.shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# Unit conversions
# --------------------------------------------------------------------------------------------------------------


def hu_to_unit(hu: np.ndarray | float, level: float = SOFT_TISSUE[0], width: float = SOFT_TISSUE[1]) -> np.ndarray:
    """HU -> LDCTIQA-style [0, 1]: ``x = clip((HU - (level - width/2)) / width, 0, 1)``.

    With the default soft-tissue window (L40/W350, :data:`SOFT_TISSUE`): ``x = clip((HU + 135) / 350, 0, 1)``.
    Returns float32, same shape as ``hu``.
    """
    lo = level - width / 2.0
    x = (np.asarray(hu, dtype=np.float64) - lo) / width
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def unit_to_hu(x: np.ndarray | float, level: float = SOFT_TISSUE[0], width: float = SOFT_TISSUE[1]) -> np.ndarray:
    """LDCTIQA [0, 1] -> HU inside the soft-tissue window: ``HU = (level - width/2) + width·x`` (= -135 + 350·x).

    Only valid where the original HU lay inside the window (values clipped to 0 or 1 lost their HU); use it only
    when the user says so (``unit_is_hu=True``). Returns float32.
    """
    lo = level - width / 2.0
    return (lo + width * np.asarray(x, dtype=np.float64)).astype(np.float32)


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 by ``floor(255·clip(x, 0, 1) + 0.5)`` (round half up), computed in float64."""
    v = 255.0 * np.clip(np.asarray(x01, dtype=np.float64), 0.0, 1.0)
    return np.floor(v + 0.5).astype(np.uint8)


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Window HU to 8-bit: ``floor(255·clip((HU - (level - width/2)) / width, 0, 1) + 0.5)``, uint8.

    Args:
        hu: array of HU values (any shape, any real dtype; computed in float64, so no integer overflow).
        level: window level (centre) in HU.
        width: window width in HU (> 0).

    Returns:
        uint8 array of the same shape. HU <= level - width/2 -> 0, HU >= level + width/2 -> 255.

    Raises:
        ValueError: width <= 0.
    """
    if not width > 0:
        raise ValueError(f"window width must be > 0 HU, got {width}")
    lo = level - width / 2.0
    return _to_uint8((np.asarray(hu, dtype=np.float64) - lo) / width)


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _warn(notes: list[str], message: str) -> None:
    """Keep ``message`` in a CTImage's notes and issue it as a CTIQAWarning (shown once per message)."""
    notes.append(message)
    warnings.warn(message, CTIQAWarning, stacklevel=3)


def _check_size(shape: tuple[int, ...], source: str) -> None:
    """Refuse an image whose height or width (the first two entries of ``shape``) is below MIN_IMAGE_SIZE."""
    h, w = int(shape[0]), int(shape[1])
    if min(h, w) < MIN_IMAGE_SIZE:
        raise CTIQAError(f"{source}: image is {w}x{h} pixels; ctiqa needs at least {MIN_IMAGE_SIZE} pixels per side "
                         "(a CT slice, not an icon or a single line)")


def _classify(arr: np.ndarray, source: str) -> CTImage:
    """Apply the detection rules of the module docstring to a decoded TIFF/PNG array, then the size floor and the
    constant-image check."""
    img = _classify_values(arr, source)
    _check_size(img.shape, source)
    _check_not_constant(img.pixels, source)
    return img


def _check_not_constant(values: np.ndarray, source: str) -> None:
    """Refuse an image with no variation at all (max == min after reading: blank, all air, all padding, or a
    Rescale Slope that flattens every value): there is no noise or structure to assess."""
    lo, hi = float(np.min(values)), float(np.max(values))
    if lo == hi:
        raise CTIQAError(f"{source}: constant image (every pixel {lo:g}): nothing to assess")


def _classify_values(arr: np.ndarray, source: str) -> CTImage:
    a = np.asarray(arr)  # (H, W) or (H, W, channels)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype == bool:
        raise CTIQAError(f"{source}: 1-bit (boolean) image; expected a CT slice")
    if a.ndim == 3 and a.shape[-1] in (2, 3, 4):  # grey+alpha, RGB, RGBA
        if a.dtype != np.uint8:
            raise CTIQAError(
                f"{source}: {a.shape[-1]}-channel {a.dtype} image; only 8-bit colour images can be converted to "
                "grey (CT must be single-channel)"
            )
        notes: list[str] = []
        if a.shape[-1] in (2, 4) and (a[..., -1] < 255).any():  # alpha is dropped: say so when it hides anything
            frac = float((a[..., -1] < 255).mean())
            _warn(notes, f"{source}: alpha channel ignored ({100 * frac:.1f} % of pixels partly or fully "
                         "transparent; the grey values are read as if opaque)")
        if a.shape[-1] == 2:
            return CTImage(a[..., 0], "display", source, notes=notes)
        r, g, b = (a[..., i].astype(np.float64) for i in range(3))
        grey = LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b
        return CTImage(grey, "display", source, notes=notes)
    if a.ndim != 2:
        raise CTIQAError(f"{source}: expected a single-channel 2-D image, got array of shape {a.shape}")
    if a.size == 0:
        raise CTIQAError(f"{source}: empty image")

    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise CTIQAError(f"{source}: image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= -UNIT_OVERSHOOT and hi <= 1.0 + UNIT_OVERSHOOT:
            notes: list[str] = []
            if lo < -UNIT_TOLERANCE or hi > 1.0 + UNIT_TOLERANCE:
                frac = float(((a < 0) | (a > 1)).mean())
                _warn(notes, f"{source}: window-normalised [0, 1] data with overshoot (values {lo:.3g}..{hi:.3g}): "
                             f"{100 * frac:.1f} % of pixels clipped to [0, 1]")
            return CTImage(np.clip(a, 0.0, 1.0), "unit", source, notes=notes)
        if lo >= -NORMALISED_LIMIT and hi <= NORMALISED_LIMIT:
            raise CTIQAError(
                f"{source}: float values {lo:.3g}..{hi:.3g} are not Hounsfield units (air is -1000 HU) and not [0, 1] "
                f"data (overshoot up to {UNIT_OVERSHOOT:g} is accepted): normalised by another convention (e.g. "
                "[-1, 1]?); save [0, 1] = soft-tissue window W350/L40, or HU"
            )
        if lo >= PLAUSIBLE_HU[0] and hi <= PLAUSIBLE_HU[1]:
            return _hu_or_stored_offset(a, source)
        raise CTIQAError(
            f"{source}: float values {lo:g}..{hi:g} are neither in [0, 1] (LDCTIQA soft-tissue window) nor "
            f"plausible HU {PLAUSIBLE_HU}"
        )
    if a.dtype == np.uint8:
        return CTImage(a, "display", source)
    if np.issubdtype(a.dtype, np.signedinteger):
        lo, hi = int(a.min()), int(a.max())
        if lo < PLAUSIBLE_HU[0] or hi > PLAUSIBLE_HU[1]:
            raise CTIQAError(f"{source}: integer values {lo}..{hi} are not plausible HU {PLAUSIBLE_HU}")
        return _hu_or_stored_offset(a, source)
    if a.dtype == np.uint16:
        hi = int(a.max())
        if hi > UINT16_MAX_CT_VALUE:
            raise CTIQAError(
                f"{source}: uint16 image with values up to {hi} (> {UINT16_MAX_CT_VALUE}): cannot tell whether it "
                "is HU + 1024 or a 16-bit display image; save HU as signed int16/float TIFF, or use the DICOM"
            )
        return CTImage(a.astype(np.float64) + UINT16_HU_INTERCEPT, "hu", source)
    raise CTIQAError(f"{source}: unsupported pixel type {a.dtype}")


def _read_tiff_pages(path: Path) -> list[np.ndarray]:
    """Decode a TIFF with tifffile (never PIL: it clips 16-bit/float) into (H, W) or (H, W, S) arrays, one per
    page/frame, in file order, using tifffile's axes labels (Y, X, S = samples; any other axis is split into frames).

    Every page is read: tifffile groups the pages into series (pages of one shape written together form one
    series; pages of other sizes, or appended one by one, form further series), and each series' frames are
    slices. Reduced-resolution levels of a pyramid (``series.levels[1:]``) are not pages of the image and are
    left out."""
    import tifffile

    out: list[np.ndarray] = []
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise CTIQAError(f"{path}: TIFF has no image data")
            for series in tf.series:
                arr, axes = series.asarray(), series.axes
                if "Y" not in axes or "X" not in axes or arr.ndim != len(axes):
                    raise CTIQAError(f"{path}: TIFF with axes {axes!r} and shape {arr.shape}; expected a 2-D image")
                image_axes = [axes.index("Y"), axes.index("X")] + ([axes.index("S")] if "S" in axes else [])
                frame_axes = [i for i in range(len(axes)) if i not in image_axes]
                arr = np.transpose(arr, frame_axes + image_axes)
                out.extend(arr.reshape((-1, *arr.shape[len(frame_axes):])))
    except CTIQAError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, OSError...
        if "imagecodecs" in str(e):  # e.g. LZW: tifffile needs the optional imagecodecs package to decode it
            return [_read_tiff_with_pil(path, e)]
        raise CTIQAError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from e
    return out


def _read_tiff_with_pil(path: Path, why: Exception) -> np.ndarray:
    """Fallback for compressions tifffile cannot decode without imagecodecs (LZW, ...): PIL's libtiff decoder,
    only for single-page grey modes whose values PIL keeps exactly (F = float32, I;16 = uint16, I = int32,
    L = uint8); never converted to another mode."""
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) == 1 and im.mode in ("F", "I;16", "I;16B", "I;16L", "I", "L"):
                im.load()
                arr = np.asarray(im)
                return arr.astype(np.uint16) if im.mode.startswith("I;16") else arr
    except Exception:
        pass
    raise CTIQAError(f"{path}: cannot decode this TIFF ({why}); `pip install imagecodecs` adds the codec")


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P" and len(im.getcolors(256) or range(3)) <= 2:  # a two-colour palette: a mask, 1-bit
                raise CTIQAError(f"{path}: 1-bit (two-colour) image; expected a CT slice")
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "1":  # a mask or overlay: refused as a 1-bit TIFF or DICOM is (QA round 12)
                raise CTIQAError(f"{path}: 1-bit (boolean) image; expected a CT slice")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except CTIQAError:
        raise
    except Exception as e:
        raise CTIQAError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
    if mode.startswith("I;16") or mode == "I":
        # 16-bit PNG: PIL gives int32 for mode "I"; keep the integer values (never clipped to 8 bit)
        if arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
    elif mode == "F":
        arr = arr.astype(np.float32)
    return arr


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _float_vector(values: Any, n: int) -> np.ndarray | None:
    """A DICOM multi-value (e.g. Image Orientation/Position) as n float64 values, or None when it is not that."""
    try:
        v = np.asarray([float(x) for x in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (n,) else None


def _slice_normal(orientation: Any) -> np.ndarray | None:
    o = _float_vector(orientation, 6)
    if o is None:
        return None
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def _position(ipp: Any, normal: np.ndarray | None) -> float | None:
    p = _float_vector(ipp, 3)
    if p is None:
        return None
    if normal is None:
        return float(p[2])  # axial assumption when the orientation is missing
    return float(p @ normal)


def _standard_axial(values: np.ndarray, orientation: Any) -> np.ndarray:
    """Flip an axis-aligned axial slice into the standard radiological display orientation.

    Standard (as in LDCTIQA / the Mayo data): columns run to the patient's left (+x), rows to posterior (+y).
    A slice stored with row direction -x or column direction -y (e.g. pydicom-data's ``explicit_VR-UN.dcm``,
    column direction (0, -1, 0)) is flipped; oblique, coronal and sagittal slices are left as stored.
    """
    try:
        o = np.asarray([float(v) for v in orientation], dtype=np.float64)
    except (TypeError, ValueError):
        return values
    if o.shape != (6,):
        return values
    row, col = o[:3], o[3:]
    if abs(abs(row[0]) - 1) > 1e-3 or abs(abs(col[1]) - 1) > 1e-3:
        return values
    if row[0] < 0:
        values = values[:, ::-1]
    if col[1] < 0:
        values = values[::-1, :]
    return values


def _padding_mask(ds: Any, arr: np.ndarray) -> np.ndarray | None:
    """Stored values marked as padding (outside the scan field of view) by Pixel Padding Value (0028,0120)
    [and Pixel Padding Range Limit (0028,0121)], DICOM PS3.3 C.7.5.1.1.2; ``None`` when there are none."""
    pad, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    try:
        lo = hi = int(pad)
        if limit is not None:
            lo, hi = sorted((int(pad), int(limit)))
    except (TypeError, ValueError):
        return None
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() else None


def _frame_item(ds: Any, frame: int, keyword: str) -> Any:
    """Enhanced multi-frame: the item of functional group ``keyword`` for ``frame`` (per-frame, else shared)."""
    for group_kw, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(group_kw)
        if groups and len(groups) > idx:
            seq = groups[idx].get(keyword)
            if seq:
                return seq[0]
    return None


def _hu_or_stored_offset(a: np.ndarray, source: str) -> CTImage:
    """A signed-integer or float TIFF/PNG read as HU, unless its values only fit the usual +1024 CT storage offset
    (the rule of a CT DICOM without Rescale Intercept, :data:`NO_RESCALE_AIR_MAX`, :data:`NO_RESCALE_TISSUE_MIN`:
    no air or fat below 0 but tissue above 824, i.e. air stored near 24): then HU = value - 1024, with a
    :class:`ctiqa.CTIQAWarning`. Read as HU such an image is air at about +24 HU, rendered nearly all white."""
    p_lo, p_hi = (float(v) for v in np.percentile(a, [0.5, 99.5]))
    if NO_RESCALE_NEGATIVE <= p_lo <= NO_RESCALE_AIR_MAX and p_hi >= NO_RESCALE_TISSUE_MIN:
        notes: list[str] = []
        _warn(notes, f"{source}: values {float(a.min()):g}..{float(a.max()):g} hold no air or fat below 0 HU: read as "
                     f"CT stored with the usual offset (HU = value {UINT16_HU_INTERCEPT:g}, as a uint16 TIFF); save "
                     "HU as signed values with air near -1000")
        return CTImage(a.astype(np.float64) + UINT16_HU_INTERCEPT, "hu", source, notes=notes)
    return CTImage(a, "hu", source)


def _ct_without_rescale(stored: np.ndarray, padding: np.ndarray | None, source: str, notes: list[str]
                        ) -> np.ndarray:
    """HU of a CT frame that has no Rescale Intercept (module docstring: decided from the stored values)."""
    body = stored[~padding] if padding is not None else stored.ravel()
    if body.size == 0:
        raise CTIQAError(f"{source}: CT without Rescale Intercept whose pixels are all padding")
    p_lo, p_hi = (float(v) for v in np.percentile(body, [0.5, 99.5]))
    if p_lo < NO_RESCALE_NEGATIVE:
        return stored  # HU stored directly: the standard's identity default, air and fat are negative numbers
    if p_lo <= NO_RESCALE_AIR_MAX and p_hi >= NO_RESCALE_TISSUE_MIN:
        hu = stored + UINT16_HU_INTERCEPT
        _warn(notes, f"{source}: CT without Rescale Slope/Intercept (required by DICOM); stored values "
                     f"{float(body.min()):g}..{float(body.max()):g} read with the usual CT intercept "
                     f"{UINT16_HU_INTERCEPT:g} (darkest 0.5 % then at {p_lo + UINT16_HU_INTERCEPT:.0f} HU); "
                     "the DICOM default intercept 0 would put air at 0 HU")
        return hu
    raise CTIQAError(
        f"{source}: CT without Rescale Slope/Intercept (required by DICOM), and its stored values "
        f"{float(body.min()):g}..{float(body.max()):g} fit neither HU stored directly (no air or fat below 0) nor "
        f"the usual intercept {UINT16_HU_INTERCEPT:g} (no air near 0 and tissue above {NO_RESCALE_TISSUE_MIN:g}): "
        "cannot tell what they mean; add the scanner's RescaleIntercept/RescaleSlope to the file"
    )


def _check_dicom_header(ds: Any, source: str) -> None:
    """Refuse from the header alone: colour pixels (RGB/YBR/palette: a secondary capture or screenshot, no CT
    values) and Rows/Columns below MIN_IMAGE_SIZE."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        modality = str(ds.get("Modality", "") or "missing")
        raise CTIQAError(
            f"{source}: colour DICOM ({photometric}, {samples} sample(s) per pixel, Modality {modality}): "
            "a secondary capture or screenshot, not CT values; export the original greyscale CT series"
        )
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if isinstance(rows, int) and isinstance(cols, int):
        _check_size((rows, cols), source)


def _dicom_frame(ds: Any, arr: np.ndarray, frame: int, source: str) -> CTImage:
    """Turn one decoded DICOM frame into a CTImage (modality LUT in float64, kind, position)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut

    modality = str(ds.get("Modality", "")).upper()
    photometric = str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").upper()
    _check_dicom_header(ds, source)
    if arr.ndim != 2:
        raise CTIQAError(f"{source}: decoded pixel data has shape {arr.shape}; expected one 2-D frame")
    _check_size(arr.shape, source)

    # 1) per-frame / shared Pixel Value Transformation (enhanced CT); pydicom's apply_modality_lut reads only the
    #    top-level attributes, so hand it a small dataset holding this frame's slope/intercept. An intercept
    #    without a slope gets slope 1.
    pvt = _frame_item(ds, frame, "PixelValueTransformationSequence")
    src = pvt if pvt is not None and pvt.get("RescaleIntercept") not in (None, "") else ds
    slope = src.get("RescaleSlope")
    slope = 1 if slope in (None, "") else slope
    try:
        zero_slope = float(slope) == 0
    except (TypeError, ValueError) as e:
        raise CTIQAError(f"{source}: Rescale Slope {slope!r} is not a number") from e
    if zero_slope:
        raise CTIQAError(f"{source}: Rescale Slope is 0 (invalid DICOM: every pixel would map to the intercept)")
    if "ModalityLUTSequence" in ds and src is ds:
        values, has_lut = apply_modality_lut(arr, ds), True
    elif src.get("RescaleIntercept") not in (None, ""):
        tmp = Dataset()
        tmp.RescaleIntercept, tmp.RescaleSlope = src.RescaleIntercept, slope
        values, has_lut = apply_modality_lut(arr, tmp), True
    else:  # no intercept: a slope alone is applied, the intercept is decided from the values below
        values, has_lut = arr * float(slope), False
    values = np.asarray(values, dtype=np.float64)

    notes: list[str] = []
    rescale_type = str(ds.get("RescaleType", "") or (pvt.get("RescaleType", "") if pvt is not None else "")).upper()
    if modality == "CT" or rescale_type == "HU":
        kind = "hu"
        padding = _padding_mask(ds, arr)
        if not has_lut:
            values = _ct_without_rescale(values, padding, source, notes)
        if padding is not None:
            values[padding] = AIR_HU
        lo, hi = float(values.min()), float(values.max())
        if lo < PLAUSIBLE_HU[0] or hi > PLAUSIBLE_HU[1]:
            raise CTIQAError(f"{source}: values {lo:g}..{hi:g} after the modality LUT are not plausible HU")
    elif int(ds.get("BitsAllocated", 8) or 8) == 1:
        raise CTIQAError(f"{source}: 1-bit (binary) image, Modality {modality or 'missing'}: a segmentation or "
                         "overlay, not CT values")
    elif not has_lut and arr.dtype == np.uint8 and modality in ("OT", ""):
        kind = "display"
        if photometric == "MONOCHROME1":  # 0 = white: invert to the grey levels of a MONOCHROME2 display
            values = 255.0 - values
    else:
        raise CTIQAError(
            f"{source}: not a CT image (Modality {modality or 'missing'}); ctiqa grades CT in Hounsfield units"
        )

    # slice position along the normal (classic: top level; enhanced: Plane Position/Orientation per frame)
    plane_pos = _frame_item(ds, frame, "PlanePositionSequence")
    plane_ori = _frame_item(ds, frame, "PlaneOrientationSequence")
    ipp = plane_pos.get("ImagePositionPatient") if plane_pos is not None else ds.get("ImagePositionPatient")
    iop = plane_ori.get("ImageOrientationPatient") if plane_ori is not None else ds.get("ImageOrientationPatient")
    position = _position(ipp, _slice_normal(iop)) if ipp is not None else None
    _check_not_constant(values, source)
    return CTImage(_standard_axial(values, iop).astype(np.float32), kind, source, position, notes)


def _read_dicom_dataset(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise CTIQAError(f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble and no "
                         "readable DICOM header)") from e
    except Exception as e:
        raise CTIQAError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise CTIQAError(f"{path}: DICOM file has no pixel data")
    return ds


def _frames_held(ds: Any) -> int | None:
    """How many whole frames uncompressed Pixel Data holds (None when it cannot be told without decoding:
    compressed, bit-packed or float pixel data, missing Image Pixel attributes)."""
    from pydicom.pixels.utils import get_expected_length

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in ds or ts is None or ts.is_encapsulated or int(ds.get("BitsAllocated", 0) or 0) < 8:
        return None
    try:
        per_frame = get_expected_length(ds, "bytes") // _n_frames(ds)
    except Exception:  # missing Rows/Columns/...: pydicom's decoder reports it
        return None
    return len(ds.PixelData) // per_frame if per_frame else None


def _excess_frames_error(path: Path, held: int, n: int) -> CTIQAError:
    return CTIQAError(f"{path}: pixel data holds {held} frame{'s' if held != 1 else ''} but Number of Frames says "
                      f"{n}: the header and the pixels disagree (a truncated or badly edited file); fix Number of "
                      "Frames (0028,0008)")


def _check_frames_held(ds: Any, path: Path) -> None:
    """Refuse uncompressed pixel data holding more or fewer whole frames than Number of Frames says."""
    n, held = _n_frames(ds), _frames_held(ds)
    if held is not None and held != n:
        raise _excess_frames_error(path, held, n)


def _decode(ds: Any, path: Path, index: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    n = _n_frames(ds)
    _check_frames_held(ds, path)
    try:
        with warnings.catch_warnings():  # pydicom's own excess-frames warning: our error below says it in one line
            warnings.filterwarnings("ignore", message=r".*'Number of Frames'")
            arr = pixel_array(ds, index=index)
    except Exception as e:  # missing decoder, truncated data, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts)
        raise CTIQAError(f"{path}: cannot decode pixel data (transfer syntax {name}): {type(e).__name__}: {e}") from e
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if index is None and arr.ndim == (3 if samples > 1 else 2) + 1:  # compressed data with excess frames
        raise _excess_frames_error(path, arr.shape[0], n)
    return arr


def _n_frames(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _iter_dicom_frames(path: Path, frames: list[int] | None = None, ds: Any = None) -> Iterator[CTImage]:
    ds = _read_dicom_dataset(path) if ds is None else ds
    n = _n_frames(ds)
    for f in range(n) if frames is None else frames:
        if not 0 <= f < n:
            raise CTIQAError(f"{path}: frame {f} out of range (the file has {n} frame{'s' if n > 1 else ''})")
        arr = _decode(ds, path, f if n > 1 else None)
        yield _dicom_frame(ds, arr, f, f"{path}#{f}" if n > 1 else str(path))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the readers read ``path`` as DICOM: suffix ``.dcm``/``.dicom``/``.ima``, no suffix, or the
    ``DICM`` marker, and not a TIFF/PNG/JPEG/BMP suffix. Exported DICOM files are often named by their SOP Instance
    UID, so commands keep such file names out of their outputs unless asked (``--file-names``)."""
    p = Path(path)
    return (p.suffix == "" or _is_dicom(p)) and p.suffix.lower() not in _TIFF_SUFFIXES | _RASTER_SUFFIXES


#: A DICOM UID (PS3.5 §9.1: dot-separated numeric components, no leading zeros, at most 64 characters), as PACS
#: exports name study and series folders; at least 4 components so that "1.2" or a version number is not one.
_UID_RE = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*)){3,}")


def names_a_uid(path: str | os.PathLike) -> bool:
    """True when a component of ``path`` is a DICOM UID (``.../1.2.840.113619.2.55.3.604688/``, with or without a
    ``.dcm`` suffix or an image suffix such as ``.tif``: slices converted from an export keep its names): exports name
    files and folders by Study/Series/SOP Instance UID, so commands keep such paths out of their outputs unless
    asked (``--file-names``)."""
    return any(len(part) <= 68 and _UID_RE.fullmatch(re.sub(r"\.(dcm|dicom|ima|tiff?|png|jpe?g)$", "", part, flags=re.I))
               for part in Path(path).parts)


def missing_reason(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be opened as a file or folder: ``"symlink loop"`` (a link that points back to itself,
    directly or through other links), ``"broken symlink"`` (a link to nothing), ``"permission denied"``,
    ``"file name too long"``, ``"not a regular file (a device, pipe or socket)"``, or ``"no such file"``.
    For the one-line errors of the readers and commands."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "not a regular file (a device, pipe or socket)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if e.errno == errno.ENAMETOOLONG:
            return "file name too long"
        if os.path.islink(path):
            return "broken symlink"
    return "no such file"


def read_ct_frames(path: str | os.PathLike) -> list[CTImage]:
    """Read every frame of a file: DICOM (multi-frame or single), multi-page TIFF, or a single image.

    Returns a list of :class:`CTImage` (one per frame, in file order; ``source`` is ``"<path>#<frame>"`` for
    multi-frame files). Raises :class:`ctiqa.CTIQAError` naming the file when it is missing, unreadable or not an
    image ctiqa understands (see the module docstring).
    """
    p = Path(path)
    if not p.is_file():
        raise CTIQAError(f"{p}: {missing_reason(p)}")
    suffix = p.suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        pages = _read_tiff_pages(p)
        if len(pages) == 1:
            return [_classify(pages[0], str(p))]
        return [_classify(a, f"{p}#{i}") for i, a in enumerate(pages)]
    if suffix in _RASTER_SUFFIXES:
        return [_classify(_read_raster(p), str(p))]
    if _is_dicom(p) or suffix == "":
        return list(_iter_dicom_frames(p))
    raise CTIQAError(f"{p}: unsupported file type {suffix!r} (DICOM, TIFF, PNG or JPEG expected)")


def read_ct(path: str | os.PathLike, frame: int | None = None) -> CTImage:
    """Read one CT slice and detect what its values mean.

    Args:
        path: DICOM (any transfer syntax pydicom can decode; the installed pylibjpeg plugins cover JPEG,
            JPEG-LS lossless and JPEG 2000), TIFF (float/int, LDCTIQA float [0, 1] or HU; multi-page), PNG,
            JPEG or BMP. Files without a suffix are tried as DICOM. Every page of a multi-page TIFF is a
            slice, also pages of different sizes or appended one by one.
        frame: 0-based frame/page index for multi-frame DICOM and multi-page TIFF. Required when the file has
            more than one frame; ``None`` or 0 for single-frame files.

    Returns:
        :class:`CTImage` with float32 pixels (H, W) and ``kind`` "hu" / "unit" / "display".

    Raises:
        CTIQAError: the message names the file: missing, unreadable, undecodable, not single-channel 2-D, values
            that fit no rule, a multi-frame file without ``frame``, or ``frame`` out of range.
    """
    p = Path(path)
    if p.is_dir():
        raise CTIQAError(f"{p}: is a folder; read a DICOM series with read_dicom_series")
    if not p.is_file():
        raise CTIQAError(f"{p}: {missing_reason(p)}")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise CTIQAError(f"{p}: frame must be an integer index, got {frame!r}")
    if (_is_dicom(p) or p.suffix == "") and p.suffix.lower() not in _TIFF_SUFFIXES | _RASTER_SUFFIXES:
        ds = _read_dicom_dataset(p)
        n = _n_frames(ds)
        _check_frames_held(ds, p)  # before asking for a frame of a file none of whose frames could be read
        if n > 1 and frame is None:
            raise CTIQAError(f"{p}: multi-frame DICOM with {n} frames; choose one with frame=0..{n - 1} (--frame)")
        return next(_iter_dicom_frames(p, [0 if frame is None else int(frame)], ds))
    frames = read_ct_frames(p)
    n = len(frames)
    if frame is None:
        if n > 1:
            raise CTIQAError(f"{p}: file holds {n} images; choose one with frame=0..{n - 1} (--frame)")
        return frames[0]
    if not 0 <= frame < n:
        raise CTIQAError(f"{p}: frame {frame} out of range (the file has {n} frame{'s' if n > 1 else ''})")
    return frames[int(frame)]


def read_dicom_folder(
    folder: str | os.PathLike, *, errors: list[tuple[str, str]] | None = None, recursive: bool = True
) -> list[list[tuple[str, CTImage]]]:
    """Read every DICOM series in a folder, each ordered along its slice normal.

    Every file (hidden files and ``DICOMDIR`` skipped; sub-folders too when ``recursive``) is read with the same
    rules as :func:`read_ct`; multi-frame files contribute one entry per frame. Files are told apart into series by
    Series Instance UID (0020,000E); the UID is used only to group, never returned. Files without one form one
    series of their own.

    Ordering within a series: by :attr:`CTImage.position` (Image Position (Patient) projected on the normal of
    Image Orientation (Patient), mm) when every slice has one; otherwise by Instance Number; ties and the rest by
    name. Series are ordered by the name of their first file.

    Args:
        folder: the folder.
        errors: if a list is given, each unreadable file is skipped and ``(path, message)`` is appended to it
            (``ctiqa predict`` reports and skips corrupt files this way); if ``None`` the first bad file raises.
        recursive: also read sub-folders.

    Returns:
        one list per series of ``(name, image)``: ``name`` is the path relative to ``folder`` (``"name#N"`` for
        frame N of a multi-frame file).

    Raises:
        CTIQAError: ``folder`` is not a folder; no readable slice in it; a bad file when ``errors`` is None.
    """
    def slices(f: Path, rel: Path) -> tuple[str, list[tuple[str, float | None, float, tuple[str, CTImage]]]]:
        ds = _read_dicom_dataset(f)
        inst_num = _instance_number(ds)
        frames = list(_iter_dicom_frames(f, ds=ds))  # all frames first: a bad frame skips the whole file
        entries = []
        for img in frames:
            name = str(rel) + img.source[len(str(f)):]
            entries.append((name, img.position, inst_num, (name, img)))
        return _series_uid(ds), _sop_uid(ds), entries

    return _scan_dicom_folder(folder, slices, errors=errors, recursive=recursive)


def read_dicom_series(
    folder: str | os.PathLike, *, errors: list[tuple[str, str]] | None = None, recursive: bool = True
) -> list[tuple[str, CTImage]]:
    """Read the one DICOM series a folder holds, ordered along the slice normal (see :func:`read_dicom_folder`).

    Returns:
        list of ``(name, image)``, ``name`` relative to ``folder``.

    Raises:
        CTIQAError: as :func:`read_dicom_folder`, and when the folder holds files of more than one series (by
            Series Instance UID; ordering them along one normal would be meaningless).
    """
    series = read_dicom_folder(folder, errors=errors, recursive=recursive)
    if len(series) > 1:
        raise CTIQAError(f"{folder}: holds {len(series)} DICOM series (different Series Instance UIDs); "
                         "give one series per folder, or read them with read_dicom_folder")
    return series[0]


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The TIFF/PNG/JPEG files directly in ``folder`` (:data:`IMAGE_SUFFIXES`; not in sub-folders), in natural name
    order, case-insensitive (``slice2`` before ``Slice10``): the slices of one series when the folder holds no DICOM
    file. A symbolic link to nothing with an image suffix is listed too (reading it fails with its reason)."""
    def key(f: Path) -> list[tuple[int, int, str]]:
        return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", f.name)]

    # a link to nothing (a volume not mounted) keeps its place: reading it fails, and the slice is listed as skipped
    return sorted((f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                   and (f.is_file() or (f.is_symlink() and not f.exists()))), key=key)


def index_dicom_folder(
    folder: str | os.PathLike, *, errors: list[tuple[str, str]] | None = None, recursive: bool = True
) -> list[list[tuple[str, Path, int | None]]]:
    """The DICOM series of a folder as ordered lists of slice references, reading headers only (no pixel data).

    Same files, grouping (Series Instance UID, never returned) and ordering as :func:`read_dicom_folder`, but
    memory does not grow with the pixels: a caller reads each slice when it needs it with
    ``read_ct(path, frame)``. A file whose pixels turn out to be unreadable fails then, not here.

    Returns:
        one list per series of ``(name, path, frame)``: ``name`` relative to ``folder`` (``"name#N"`` for frame N
        of a multi-frame file), ``frame`` None for a single-frame file.
    Raises:
        CTIQAError: as :func:`read_dicom_folder` (not a folder; no DICOM header readable; a bad file when
            ``errors`` is None).
    """
    import pydicom

    def slices(f: Path, rel: Path) -> tuple[str, list[tuple[str, float | None, float, tuple[str, Path, int | None]]]]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            shape = (ds.get("Rows"), ds.get("Columns"))
        except Exception as e:
            raise CTIQAError(f"{f}: unreadable DICOM header ({type(e).__name__}: {e})") from e
        if not all(isinstance(v, int) for v in shape):  # a file cut inside its header, or no image: not a slice
            raise CTIQAError(f"{f}: no image in this DICOM file (no Rows/Columns: cut short, or not an image)")
        _check_dicom_header(ds, str(f))
        inst_num = _instance_number(ds)
        n = _n_frames(ds)
        out = []
        for k in range(n):
            pos_item = _frame_item(ds, k, "PlanePositionSequence")
            ori_item = _frame_item(ds, k, "PlaneOrientationSequence")
            ipp = pos_item.get("ImagePositionPatient") if pos_item is not None else ds.get("ImagePositionPatient")
            iop = ori_item.get("ImageOrientationPatient") if ori_item is not None else ds.get(
                "ImageOrientationPatient")
            position = _position(ipp, _slice_normal(iop)) if ipp is not None else None
            name = str(rel) + (f"#{k}" if n > 1 else "")
            out.append((name, position, inst_num, (name, f, k if n > 1 else None)))
        return _series_uid(ds), _sop_uid(ds), out

    return _scan_dicom_folder(folder, slices, errors=errors, recursive=recursive)


def _instance_number(ds: Any) -> float:
    """Instance Number (0020,0013) as a float; ``inf`` when absent or not a number (such slices sort last)."""
    inst = ds.get("InstanceNumber")
    try:
        return float(inst) if inst not in (None, "") else math.inf
    except (TypeError, ValueError):
        return math.inf


def _series_uid(ds: Any) -> str:
    """Series Instance UID (0020,000E), used only to group files; "" when absent."""
    return str(ds.get("SeriesInstanceUID", "") or "")


def _sop_uid(ds: Any) -> str:
    """SOP Instance UID (0008,0018), used only to find a file given twice; "" when absent."""
    return str(ds.get("SOPInstanceUID", "") or "")


def _scan_dicom_folder(folder: str | os.PathLike, slices: Callable[[Path, Path], tuple[str, list[Any]]], *,
                       errors: list[tuple[str, str]] | None, recursive: bool) -> list[list[Any]]:
    """The file walk, grouping and ordering shared by :func:`read_dicom_folder` and :func:`index_dicom_folder`.

    ``slices(path, relative_path)`` reads one file and returns ``(series UID, SOP Instance UID, [(name, position or
    None, instance number, item), ...])``; a :class:`CTIQAError` from it skips the whole file when ``errors`` is a
    list. A file with the Series and SOP Instance UIDs, position and Instance Number of one read before (a copy: ``x
    copy.dcm``, a backup sub-folder) is the same image: it is left out, and listed in ``errors`` when given (else silently), so a series never counts a slice
    twice. Returns the items, one list per series, ordered as :func:`read_dicom_folder` documents.
    """
    root = Path(folder)
    if not root.is_dir():
        raise CTIQAError(f"{root}: not a folder")
    files = sorted(root.rglob("*") if recursive else root.iterdir())
    groups: dict[str, list[tuple[str, float | None, float, Any]]] = {}
    instances: set[tuple[Any, ...]] = set()
    for f in files:
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or f.name.upper() == "DICOMDIR":
            continue
        if f.is_symlink() and not f.exists():  # a link to nothing (a volume not mounted): listed, never dropped
            if errors is None:
                raise CTIQAError(f"{f}: {missing_reason(f)}")
            errors.append((str(f), f"{f}: {missing_reason(f)}"))
            continue
        if not f.is_file():
            continue
        try:
            if not _is_dicom(f) and f.suffix != "":
                raise CTIQAError(f"{f}: not a DICOM file")
            uid, sop, entries = slices(f, rel)
            key = (uid, sop, tuple((e[1], e[2]) for e in entries))  # same instance at the same place: one image
            if sop and key in instances:
                if errors is not None:
                    errors.append((str(f), f"{f}: a copy of another file of this folder (the same SOP Instance UID): "
                                           "left out, so that no slice counts twice"))
                continue
            instances.add(key)
            groups.setdefault(uid, []).extend(entries)
        except CTIQAError as e:
            if errors is None:
                raise
            errors.append((str(f), str(e)))
    if not groups:
        raise CTIQAError(f"{root}: no readable DICOM slices in this folder")
    out = []
    for entries in sorted(groups.values(), key=lambda g: min(e[0] for e in g)):
        if all(e[1] is not None for e in entries):
            entries.sort(key=lambda e: (e[1], e[2], e[0]))
        else:
            entries.sort(key=lambda e: (e[2], e[0]))
        out.append([item for _, _, _, item in entries])
    return out


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def image_sha256(image: Image.Image) -> str:
    """SHA-256 (hex) of a PIL image's pixels: mode, size and raw bytes (independent of PNG encoder settings).

    The content key of a rendered image in the teacher answer cache (:mod:`datasets_builder.cache`) and the server
    answer cache (:mod:`ctiqa.serving`)."""
    import hashlib

    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def encoding_info(encoding: str) -> dict[str, Any]:
    """A JSON-serialisable description of an encoding, for provenance (dataset cards, results.json).

    Keys: ``name``, ``channels`` (R, G, B: each ``{"level", "width", "lo_hu", "hi_hu"}`` in HU), ``rounding``,
    ``source`` (where the windows come from), ``inputs`` (which :attr:`CTImage.kind` it accepts).

    Raises:
        CTIQAError: unknown encoding name.
    """
    if encoding == "soft-tissue":
        windows = [SOFT_TISSUE] * 3
        source = "LDCTIQA 2023 preprocessing: soft-tissue window W350/L40, one window replicated to R, G, B"
        inputs = ["hu", "unit (is this window: round(255*x))", "display (grey replicated)"]
    elif encoding == "medgemma-3window":
        windows = list(MEDGEMMA_3WINDOW)
        source = "Google MedGemma CT convention: R -1024..1024, G -135..215, B 0..80 HU"
        inputs = ["hu", "unit only with unit_is_hu=True (HU = -135 + 350*x)"]
    else:
        raise CTIQAError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return {
        "name": encoding,
        "channels": [
            {"level": lv, "width": w, "lo_hu": lv - w / 2, "hi_hu": lv + w / 2} for lv, w in windows
        ],
        "rounding": "uint8 = floor(255 * clip((HU - lo_hu) / width, 0, 1) + 0.5)",
        "source": source,
        "inputs": inputs,
    }


def render(
    img_or_path: CTImage | str | os.PathLike,
    encoding: str = DEFAULT_ENCODING,
    *,
    unit_is_hu: bool = False,
    frame: int | None = None,
) -> Image.Image:
    """Render a CT slice to the RGB 8-bit image the VLM sees (before the processor's own resize).

    Encodings (:data:`ENCODINGS`, described by :func:`encoding_info`):

    ``"soft-tissue"``
        ``window(HU, 40, 350)`` replicated to R, G, B. For ``kind="unit"`` (LDCTIQA) the values already ARE this
        window: ``floor(255·clip(x, 0, 1) + 0.5)``. For ``kind="display"`` the grey values (rounded half up)
        are replicated.
    ``"medgemma-3window"``
        R/G/B = ``window`` with (L0/W2048, L40/W350, L40/W80), needs HU. ``kind="unit"`` is refused unless
        ``unit_is_hu=True`` (then HU = -135 + 350·x, so R and B only see the soft-tissue range); ``"display"``
        is refused.

    Args:
        img_or_path: a :class:`CTImage` or a path read with :func:`read_ct`.
        encoding: one of :data:`ENCODINGS`.
        unit_is_hu: allow rebuilding HU from LDCTIQA [0, 1] data for ``medgemma-3window``.
        frame: frame index when ``img_or_path`` is a multi-frame file.

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"``, size (W, H) of the slice.

    Raises:
        CTIQAError: unknown encoding; an encoding that needs HU given [0, 1] or display data; read errors.
    """
    info = encoding_info(encoding)  # validates the name
    img = img_or_path if isinstance(img_or_path, CTImage) else read_ct(img_or_path, frame=frame)
    px = img.pixels
    if encoding == "soft-tissue":
        if img.kind == "hu":
            grey = window(px, *SOFT_TISSUE)
        elif img.kind == "unit":
            grey = _to_uint8(px)
        else:
            grey = _to_uint8(px / 255.0)
        rgb = np.stack([grey] * 3, axis=-1)
    else:
        if img.kind == "unit":
            if not unit_is_hu:
                raise CTIQAError(
                    f"{img.source}: values are in [0, 1] (LDCTIQA soft-tissue window, not HU): only one window can "
                    "be rebuilt, so the medgemma-3window encoding is not available; use encoding 'soft-tissue', or "
                    "pass unit_is_hu=True (--unit-is-hu) to treat HU = -135 + 350*x"
                )
            hu = unit_to_hu(px)
        elif img.kind == "display":
            raise CTIQAError(
                f"{img.source}: an 8-bit display image has no Hounsfield units; medgemma-3window needs HU "
                "(DICOM, or TIFF in HU); use encoding 'soft-tissue'"
            )
        else:
            hu = px
        rgb = np.stack([window(hu, c["level"], c["width"]) for c in info["channels"]], axis=-1)
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def check_model_image(img: Any, source: str | None = None) -> Image.Image:
    """Check that an image is what the model was trained on before it reaches the processor: an 8-bit RGB
    ``PIL.Image`` (mode ``"RGB"``, :func:`render` output), at least :data:`MIN_IMAGE_SIZE` pixels per side.

    Images that skip :func:`render` (the Python API, hand-built datasets) are not converted: PIL's
    ``convert("RGB")`` would clip 16-bit and float data to 0..255 and drop alpha without a word, and a grey image
    says nothing about the encoding the model expects.

    Args:
        img: the image.
        source: its name for the message (default: the PIL image's ``filename``, else ``"image"``).

    Returns:
        ``img`` itself, unchanged.

    Raises:
        CTIQAError: not a PIL image; a mode other than ``"RGB"`` (``"L"`` grey, ``"I;16"`` 16-bit, ``"F"`` float,
            ``"RGBA"``, ``"P"`` palette, ...); a side below :data:`MIN_IMAGE_SIZE`. The message names the image.
    """
    name = source or getattr(img, "filename", "") or "image"
    if not isinstance(img, Image.Image):
        raise CTIQAError(f"{name}: expected a PIL RGB image (ctiqa.imaging.render output), got {type(img).__name__}")
    if img.mode != "RGB":
        raise CTIQAError(
            f"{name}: image mode {img.mode!r}, but the model was trained on 8-bit RGB (mode 'RGB'); render CT with "
            "ctiqa.imaging.render, or convert it yourself if you know the conversion is lossless"
        )
    _check_size((img.height, img.width), name)
    return img


# --------------------------------------------------------------------------------------------------------------
# CLI: ctiqa render INPUT --out FILE.png
# --------------------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ctiqa render``."""
    parser.add_argument("input", help="CT file: DICOM, TIFF (LDCTIQA [0,1] or HU), PNG or JPEG")
    parser.add_argument("--out", required=True, help="output PNG: exactly the RGB image the model sees")
    parser.add_argument("--encoding", default=DEFAULT_ENCODING, choices=list(ENCODINGS), help="RGB encoding")
    parser.add_argument("--frame", type=int, default=None, help="0-based frame of a multi-frame file")
    parser.add_argument(
        "--unit-is-hu", action="store_true",
        help="treat LDCTIQA [0,1] values as HU = -135 + 350*x (needed for medgemma-3window on LDCTIQA data)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (refused without it: a PNG carries no mark of who "
                        "wrote it, so an existing one may be yours)")


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa render``: read, render, write a PNG; prints what was detected (not the input path: DICOM files are
    often named by their SOP Instance UID). An existing non-empty ``--out`` is replaced only with ``--overwrite``.
    Returns 0."""
    if Path(args.input).is_dir():
        raise CTIQAError(f"{args.input}: is a folder; ctiqa render takes one file (ctiqa predict and ctiqa findings "
                         "take series folders)")
    out = check_output_path(args.out, ours=bool(args.overwrite), inputs=[args.input],
                            hint="give another --out" + ("" if args.overwrite else ", or --overwrite to replace it"))
    if out.suffix.lower() != ".png":
        raise CTIQAError(f"{out}: the output must be a .png file (lossless)")
    img = read_ct(args.input, frame=args.frame)
    rgb = render(img, args.encoding, unit_is_hu=args.unit_is_hu)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:  # --overwrite onto a symbolic link replaces the link, not its target
        rgb.save(f, format="PNG")
    px = img.pixels
    print(
        f"wrote {out}: {img.kind} {px.shape[1]}x{px.shape[0]} values {float(px.min()):g}..{float(px.max()):g} "
        f"({args.encoding})" + (f"; {len(img.notes)} warning(s) above" if img.notes else "")
    )
    return 0
