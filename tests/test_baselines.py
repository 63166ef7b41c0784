"""The noise-σ baseline: σ estimate on rendered images and its score fit."""

import numpy as np
import pytest
from PIL import Image

from ctiqa.baselines import NoiseSigmaBaseline, noise_sigma


def _noisy(sigma_grey: float, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.tile(np.linspace(60, 190, 96), (96, 1))
    a = np.clip(np.rint(base + rng.normal(0, sigma_grey, base.shape)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([a] * 3, -1))


def test_noise_sigma_tracks_added_noise():
    est = [noise_sigma(_noisy(s)) * 255 for s in (2, 5, 10, 20)]
    assert est == sorted(est)
    assert est[2] == pytest.approx(10, rel=0.15)  # wavelet MAD estimate of σ in grey levels


def test_fit_recovers_monotone_decreasing_map_and_clips():
    sig = np.array([0.01, 0.02, 0.04, 0.08])
    scores = 4.0 - np.log2(sig / 0.01)  # 4, 3, 2, 1
    m = NoiseSigmaBaseline.fit(sig, scores)
    assert m.slope < 0
    assert m.predict([0.02]) == [pytest.approx(3.0)]
    assert m.predict([1e-6, 10.0]) == [4.0, 0.0]


def test_fit_refuses_constant_sigma():
    with pytest.raises(ValueError, match="different noise levels"):
        NoiseSigmaBaseline.fit([0.1, 0.1], [1.0, 2.0])
