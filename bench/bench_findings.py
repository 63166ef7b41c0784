"""Validate the measured findings (ctiqa.findings) against the simulator's truth; prints the figures of issue 11.

    ctiqa simulate --out runs/sim200 --n-images 200 --size 128 --seed 1
    python bench/bench_findings.py runs/sim200 [--findings runs/sim200-findings.jsonl]

Without ``--findings`` the images are measured here (``ctiqa findings`` writes the same rows). Figures:

* noise: Spearman(noise_hu, true ``noise_sigma_hu``) (bar >= 0.95), the share of images with sigma >= 17 HU whose
  noise_hu is within +-20 % of the truth (and the median ratio per severity band), the calibration constant the
  training base slices would give (median true/measured for sigma >= 17 HU, held-out ``test_base_slices`` out);
  noise-severity agreement with the true band.
* streaks: AUC of the streak index for n_views < 256 vs >= 512, raw and on the residual of a linear fit of the
  index on log(true sigma) (bar >= 0.80: the measure must see streaks, not the noise that comes with fewer views);
  the same for the noise estimate as a "streak index" (what knowing nothing of streaks scores); the call's
  sensitivity / specificity.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats


def auc(positive: np.ndarray, x: np.ndarray) -> float:
    """Area under the ROC curve of ``x`` for the boolean labels ``positive`` (Mann-Whitney U / (n1 n0))."""
    pos = np.asarray(positive, bool)
    return float(stats.mannwhitneyu(x[pos], x[~pos]).statistic / (pos.sum() * (~pos).sum()))


def residual(index: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Residual of the least-squares line ``index ~ a + b log(sigma)``."""
    a = np.c_[np.ones(len(sigma)), np.log(sigma)]
    coef, *_ = np.linalg.lstsq(a, index, rcond=None)
    return index - a @ coef


def sigma_matched_auc(positive: np.ndarray, x: np.ndarray, sigma: np.ndarray, n_bins: int = 8) -> tuple[float, int]:
    """AUC over pairs (positive, negative) in the same log-sigma bin (bins span the range both groups share)."""
    pos, ls = np.asarray(positive, bool), np.log(sigma)
    lo, hi = max(ls[pos].min(), ls[~pos].min()), min(ls[pos].max(), ls[~pos].max())
    num = den = 0.0
    if hi <= lo:
        return float("nan"), 0
    edges = np.linspace(lo, hi, n_bins + 1)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        m = (ls >= a) & (ls <= b)
        p, q = x[m & pos], x[m & ~pos]
        num += (p[:, None] > q[None, :]).sum() + 0.5 * (p[:, None] == q[None, :]).sum()
        den += len(p) * len(q)
    return (num / den if den else float("nan")), int(den)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sim", type=Path, help="a `ctiqa simulate` output folder")
    p.add_argument("--findings", type=Path, help="rows written by `ctiqa findings` (default: measure here)")
    args = p.parse_args(argv)
    deg = json.loads((args.sim / "degradations.json").read_text())
    meta = {Path(k).stem: v for k, v in deg["images"].items()}
    if args.findings:
        rows = {r["id"]: r for r in map(json.loads, args.findings.read_text().splitlines())}
    else:
        from ctiqa.findings import measure_findings
        from ctiqa.imaging import read_ct

        t0 = time.perf_counter()
        rows = {k: measure_findings(read_ct(args.sim / "image" / f"{k}.tif"), k).to_row() for k in sorted(meta)}
        print(f"measured {len(rows)} images in {time.perf_counter() - t0:.1f} s")
    ids = [k for k in sorted(meta) if k in rows and rows[k]["noise_hu"] is not None]
    from ctiqa.findings import NOISE_CALIBRATION, STREAK_THRESHOLD
    from ctiqa.vocabulary import noise_severity

    sig = np.array([meta[k]["noise_sigma_hu"] for k in ids])
    views = np.array([meta[k]["n_views"] for k in ids])
    test = np.array([meta[k]["base_slice"] in deg.get("test_base_slices", []) for k in ids])
    est = np.array([rows[k]["noise_hu"] for k in ids])
    idx = np.array([rows[k]["streak_index"] for k in ids])
    call = np.array([rows[k]["streaks"] for k in ids])
    print(f"{args.sim}: {len(ids)} of {len(meta)} images with a noise measurement")

    srcc = stats.spearmanr(est, sig)[0]
    hi = sig >= 17
    within = np.abs(est / sig - 1) <= 0.2
    print(f"noise: SRCC(noise_hu, true sigma) = {srcc:.4f} (bar 0.95)")
    print(f"noise: within +-20 % for sigma >= 17 HU: {within[hi].mean():.1%} of {hi.sum()} "
          f"(held-out base slices {within[hi & test].mean():.1%} of {(hi & test).sum()})")
    for lo, up in ((9, 17), (17, 32), (32, 60), (60, 1e9)):
        m = (sig >= lo) & (sig < up)
        if m.any():
            r = est[m] / sig[m]
            print(f"  sigma {lo:>3}-{up if up < 1e9 else 'inf':<4} HU  n={m.sum():>3}  measured/true median "
                  f"{np.median(r):.3f}  (10-90 %: {np.percentile(r, 10):.3f}-{np.percentile(r, 90):.3f})")
    train = hi & ~test
    if train.any():
        print(f"  calibration from the training base slices: {NOISE_CALIBRATION * np.median(sig[train] / est[train]):.3f}"
              f" (in use: {NOISE_CALIBRATION})")
    sev = np.mean([noise_severity(a) == noise_severity(b) for a, b in zip(est, sig, strict=True)])
    print(f"noise: severity class = true class on {sev:.1%}")

    m = (views < 256) | (views >= 512)
    pos = (views < 256)[m]
    li = np.log(np.maximum(idx, 1e-6))
    print(f"streaks: n_views < 256: {pos.sum()}, >= 512: {(~pos).sum()} (256-511 left out)")
    print(f"streaks: AUC raw {auc(pos, li[m]):.3f}, on the residual after log(true sigma) "
          f"{auc(pos, residual(li, sig)[m]):.3f} (bar 0.80)")
    matched, pairs = sigma_matched_auc(pos, li[m], sig[m])
    print(f"streaks: sigma-matched AUC {matched:.3f} ({pairs} pairs in shared log-sigma bins)")
    oracle = -np.log(views.astype(float))
    print(f"  oracle index -log(n_views): residual AUC {auc(pos, residual(oracle, sig)[m]):.3f} (the most any index "
          f"can score on this criterion here; Spearman(n_views, sigma) = {stats.spearmanr(views, sig)[0]:.2f})")
    print(f"  noise estimate as a 'streak index': raw {auc(pos, np.log(est)[m]):.3f}, residual "
          f"{auc(pos, residual(np.log(est), sig)[m]):.3f}")
    bal = (call[views < 256].mean() + (~call[views >= 512]).mean()) / 2
    print(f"streaks: call (index >= {STREAK_THRESHOLD:g}) balanced accuracy n_views < 256 vs >= 512: {bal:.3f}")
    for lo, up in ((64, 128), (128, 256), (256, 512), (512, 1025)):
        mm = (views >= lo) & (views < up)
        if mm.any():
            print(f"  views {lo:>4}-{up - 1:<4} n={mm.sum():>3}  index median {np.median(idx[mm]):7.1f}  "
                  f"called present {call[mm].mean():.1%} (threshold {STREAK_THRESHOLD:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
