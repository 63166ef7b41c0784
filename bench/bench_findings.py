"""Validate the measured findings (ctiqa.findings) against the simulator's truth; prints the figures of issue 11.

    ctiqa simulate --out runs/sim200 --n-images 200 --size 128 --seed 1
    python bench/bench_findings.py runs/sim200 [--findings runs/sim200-findings.jsonl]
    python bench/bench_findings.py --independent 300 [--seed 1]     # views and noise drawn independently

``ctiqa simulate``'s quality ladder couples views and noise (Spearman(n_views, sigma) = -0.90), so the residual-AUC
bar is out of reach there (an oracle index -log(n_views) scores 0.64-0.75). ``--independent N`` builds a
validation set where they are independent (:func:`independent_set`): the same physics and base slices
(:func:`ctiqa.simulation.degrade` on the pydicom-shipped slices, one 128x128 crop per level), but n_views and the
quantum noise sigma are drawn independently (log-uniform), the dose fraction following from them. Drawing the dose
fraction instead of sigma independently of n_views would not decouple them: sigma = 9 HU / sqrt(d n / 1024) falls
with n at any fixed dose (Spearman(n_views, sigma) -0.77 for d and n both log-uniform over the simulator's ranges).
The set is cached under the system temp folder (``ctiqa-bench-findings/``), never in the repository.

Without ``--findings`` the images are measured here (``ctiqa findings`` writes the same rows). Figures:

* noise: Spearman(noise_hu, true ``noise_sigma_hu``) (bar >= 0.95), the share of images with sigma >= 17 HU whose
  noise_hu is within +-20 % of the truth (and the median ratio per severity band), the calibration constant the
  training base slices would give (median true/measured for sigma >= 17 HU, held-out ``test_base_slices`` out);
  noise-severity agreement with the true band.
* streaks: AUC of the streak index for n_views < 256 vs >= 512, raw and on the residual of a linear fit of the
  index on log(true sigma) (bar >= 0.80: the measure must see streaks, not the noise that comes with fewer views);
  a sigma-matched AUC; an oracle index -log(n_views) (what knowing the views scores on that criterion); the same
  for the noise estimate as a "streak index" (what knowing nothing of streaks scores); Spearman(n_views, sigma);
  the call's sensitivity / specificity, per view band; the time of ``measure_findings`` on a 512x512 image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
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


#: Independent set: sigma log-uniform over [sigma at (dose 1, 64 views), sigma at (dose 0.1, 64 views)] = [36, 114]
#: HU: the widest range every view count reaches with dose <= 1 (the upper end is ctiqa simulate's highest sigma);
#: n_views log-uniform over the simulator's VIEWS_RANGE (64..1024), so about half are < 256 and a quarter >= 512.
INDEPENDENT_VERSION = "1"


def independent_set(n: int, seed: int = 1, size: int = 128, root: Path | None = None,
                    base_slices: list[str] | None = None, cache_dir: Path | None = None) -> Path:
    """A validation set (ctiqa simulate layout: image/NNNN.tif, degradations.json) with n_views independent of the
    noise: per image a base slice (round robin over those usable at ``size``), n_views ~ log-uniform(64, 1024),
    sigma ~ log-uniform(9 HU sqrt(1024/64), expected_noise_hu(0.1, 64)), dose fraction = 1024/n (9 HU/sigma)^2
    (in (0, 1]), one crop at a seeded position holding >= MIN_TISSUE_FRACTION soft tissue, one Poisson draw.
    ``base_slices``: names to use (default: all usable at ``size``); ``cache_dir``: the sinogram cache (default
    :func:`ctiqa.simulation.default_cache_dir`). Written once under ``root`` (default: the temp folder) and reused.
    Returns the folder."""
    import tifffile

    from ctiqa.imaging import hu_to_unit
    from ctiqa.simulation import (
        BASE_SLICES,
        DEFAULT_TEST_BASE_SLICES,
        FULL_DOSE_NOISE_HU,
        MIN_TISSUE_FRACTION,
        N_FULL_VIEWS,
        PHYSICS_VERSION,
        VIEWS_RANGE,
        base_slice_path,
        default_cache_dir,
        degrade,
        expected_noise_hu,
        project_base_slice,
        resolve_base_slices,
        tissue_fraction_map,
    )

    root = Path(root) if root is not None else Path(tempfile.gettempdir()) / "ctiqa-bench-findings"
    usable, _ = resolve_base_slices(base_slices, size)
    names = "-".join(BASE_SLICES[i].name for i in usable) if base_slices is not None else "all"
    out = root / f"independent-n{n}-seed{seed}-size{size}-{names}-p{PHYSICS_VERSION}-v{INDEPENDENT_VERSION}"
    if (out / "degradations.json").is_file():
        return out
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    projs = [project_base_slice(BASE_SLICES[i], base_slice_path(BASE_SLICES[i]), cache) for i in usable]
    valid = [np.zeros((1, 2), int) if p.hu.shape[0] <= size
             else np.argwhere(tissue_fraction_map(p.hu, size) >= MIN_TISSUE_FRACTION) for p in projs]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4242]))
    lo_s, hi_s = FULL_DOSE_NOISE_HU * math.sqrt(N_FULL_VIEWS / VIEWS_RANGE[0]), expected_noise_hu(0.1, VIEWS_RANGE[0])
    (out / "image").mkdir(parents=True, exist_ok=True)
    images, t0 = {}, time.perf_counter()
    for k in range(n):
        j = k % len(projs)
        proj = projs[j]
        views = int(round(math.exp(rng.uniform(*np.log(VIEWS_RANGE)))))
        sigma = float(math.exp(rng.uniform(math.log(lo_s), math.log(hi_s))))
        dose = min(1.0, N_FULL_VIEWS / views * (FULL_DOSE_NOISE_HU / sigma) ** 2)
        y, x = (int(v) for v in valid[j][rng.integers(len(valid[j]))])
        grid = np.arange(size)
        add = degrade(proj, dose, views, rng, pixels=((y + grid)[:, None], (x + grid)[None, :]))
        img = hu_to_unit(proj.hu[y:y + size, x:x + size].astype(np.float64) + add).astype(np.float32)
        name = f"{k:04d}.tif"
        tifffile.imwrite(out / "image" / name, img)
        images[name] = {"base_slice": proj.name, "dose_fraction": round(dose, 5), "n_views": views,
                        "noise_sigma_hu": round(expected_noise_hu(dose, views), 2), "crop": [y, x, size],
                        "synthetic": True}
    print(f"independent set: {n} images of {size} px in {time.perf_counter() - t0:.1f} s -> {out}")
    held = [h for h in DEFAULT_TEST_BASE_SLICES if h in {p.name for p in projs}]
    deg = {"synthetic": True, "independent": True, "seed": seed, "size": size, "n_images": n,
           "test_base_slices": held, "images": images}
    tmp = out / "degradations.json.tmp"
    tmp.write_text(json.dumps(deg, indent=1))
    tmp.replace(out / "degradations.json")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sim", type=Path, nargs="?", help="a `ctiqa simulate` output folder")
    p.add_argument("--findings", type=Path, help="rows written by `ctiqa findings` (default: measure here)")
    p.add_argument("--independent", type=int, metavar="N",
                   help="instead of SIM: build (or reuse) N images with n_views independent of the noise sigma")
    p.add_argument("--seed", type=int, default=1, help="seed of the --independent set (default 1)")
    args = p.parse_args(argv)
    if (args.sim is None) == (args.independent is None):
        p.error("give a simulation folder or --independent N")
    if args.independent is not None:
        args.sim = independent_set(args.independent, args.seed)
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
    print(f"  oracle index -log(n_views): residual AUC {auc(pos, residual(oracle, sig)[m]):.3f} (an index that knows "
          f"the views; Spearman(n_views, sigma) = {stats.spearmanr(views, sig)[0]:.2f}, "
          f"Spearman(n_views, dose_fraction) = {stats.spearmanr(views, [meta[k]['dose_fraction'] for k in ids])[0]:.2f})")
    print(f"  noise estimate as a 'streak index': raw {auc(pos, np.log(est)[m]):.3f}, residual "
          f"{auc(pos, residual(np.log(est), sig)[m]):.3f}")
    sens, spec = call[views < 256].mean(), (~call[views >= 512]).mean()
    print(f"streaks: call (index >= {STREAK_THRESHOLD:g}) n_views < 256 vs >= 512: sensitivity {sens:.3f}, "
          f"specificity {spec:.3f}, balanced accuracy {(sens + spec) / 2:.3f}")
    for lo, up in ((64, 128), (128, 200), (200, 256), (256, 512), (512, 1025)):
        mm = (views >= lo) & (views < up)
        if mm.any():
            print(f"  views {lo:>4}-{up - 1:<4} n={mm.sum():>3}  index median {np.median(idx[mm]):7.2f}  "
                  f"called present {call[mm].mean():.1%} (threshold {STREAK_THRESHOLD:g})")
    from ctiqa.findings import measure_findings
    from ctiqa.imaging import CTImage

    big = CTImage(np.random.default_rng(0).normal(40.0, 30.0, (512, 512)).astype(np.float32), "hu", "timing")
    measure_findings(big)
    t0 = time.perf_counter()
    for _ in range(20):
        measure_findings(big)
    print(f"timing: measure_findings on a 512x512 HU image {1000 * (time.perf_counter() - t0) / 20:.1f} ms "
          "(noise + streaks, one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
