"""Classical no-reference baseline: a noise-σ estimate mapped to the 0-4 scale.

Reported beside the VLM so that its accuracy is judged honestly: on simulated low-dose data, where quality is
driven by quantum noise, a noise estimate is a strong baseline.

σ is estimated with :func:`skimage.restoration.estimate_sigma` (wavelet-domain robust median estimator,
Donoho & Johnstone 1994) on the exact RGB image the model sees (first channel, scaled to [0, 1]). The score is a
linear fit ``score ≈ a + b·log(σ)`` on the TRAINING images only (never the test split), clipped to [0, 4].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ctiqa.scale import SCORE_MAX, SCORE_MIN

#: Floor on σ before the log, in display units ([0, 1]); 1/255/10 is far below one 8-bit grey level.
_SIGMA_FLOOR = 1.0 / 2550.0


def noise_sigma(image: Image.Image | np.ndarray) -> float:
    """Noise standard deviation of one rendered image.

    Args:
        image: the RGB uint8 PIL image (or an (H, W) / (H, W, 3) uint8 array) that the model sees.
    Returns:
        σ in display units of the first channel scaled to [0, 1] (multiply by 350 for HU under the soft-tissue
        window W350). Always ≥ 0.
    Raises:
        ValueError: the image is not 2-D gray or 3-D with channels last.
    """
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(a.astype(np.float64) / 255.0))


@dataclass(frozen=True)
class NoiseSigmaBaseline:
    """``score = clip(intercept + slope·log(max(σ, floor)), 0, 4)``, fitted by least squares."""

    intercept: float
    slope: float

    @classmethod
    def fit(cls, sigmas: Sequence[float], scores: Sequence[float]) -> NoiseSigmaBaseline:
        """Least-squares fit on training images.

        Raises:
            ValueError: fewer than 2 points, or all σ equal (nothing to fit).
        """
        x = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), _SIGMA_FLOOR))
        y = np.asarray(scores, dtype=np.float64)
        if x.size < 2 or np.ptp(x) == 0:
            raise ValueError("need at least two training images with different noise levels to fit the baseline")
        slope, intercept = np.polyfit(x, y, 1)
        return cls(float(intercept), float(slope))

    def predict(self, sigmas: Iterable[float]) -> list[float]:
        """Scores in [0, 4] for the given σ values (display units)."""
        return [
            float(min(SCORE_MAX, max(SCORE_MIN, self.intercept + self.slope * math.log(max(s, _SIGMA_FLOOR)))))
            for s in sigmas
        ]


def noise_sigma_predictions(dataset_path: str, out_file: str, *, fit_split: str = "train",
                            test_split: str = "test") -> dict[str, float]:
    """Fit the noise-σ baseline on ``fit_split`` of a ctiqa dataset and write predictions for ``test_split``.

    Args:
        dataset_path: Hub id or local Hub-layout folder written by ``ctiqa build-dataset``.
        out_file: JSONL written with one ``{"id", "score", "prediction", "sigma"}`` row per test image, the format
            ``ctiqa evaluate --predictions`` reads.
    Returns:
        the fitted ``{"intercept", "slope"}``.
    """
    import json

    from datasets import load_dataset

    from ctiqa.paths import check_dataset_finished

    check_dataset_finished(dataset_path)
    ds = load_dataset(dataset_path)
    train = ds[fit_split]
    sig_train = [noise_sigma(row["images"][0]) for row in train]
    model = NoiseSigmaBaseline.fit(sig_train, train["score"])
    test = ds[test_split]
    sig_test = [noise_sigma(row["images"][0]) for row in test]
    preds = model.predict(sig_test)
    from pathlib import Path

    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w") as f:
        for row_id, score, pred, s in zip(test["id"], test["score"], preds, sig_test, strict=True):
            f.write(json.dumps({"id": row_id, "score": score, "prediction": pred, "sigma": s}) + "\n")
    return {"intercept": model.intercept, "slope": model.slope}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m ctiqa.baselines DATASET OUT.jsonl  (fits on train, predicts test)")
    print(noise_sigma_predictions(sys.argv[1], sys.argv[2]))
