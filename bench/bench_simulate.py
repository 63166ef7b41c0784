"""Speed and peak memory of ``ctiqa simulate`` (mini-LDCTIQA from real CT).

Runs ``ctiqa simulate`` as a subprocess for each ``N x SIZE`` configuration, first with an empty sinogram cache
(cold: radon + reference FBP + calibration per base slice, then the degradation levels) and then again with the
cache filled (warm: levels only). Prints wall seconds, seconds per image and the peak resident memory of the
process tree (``ru_maxrss`` of the waited process, which includes its worker processes on Linux). CPU seconds
(user + system, workers included) do not depend on how busy the machine is; wall seconds do.

    python bench/bench_simulate.py                      # 20x256 and 20x128
    python bench/bench_simulate.py --configs 50x256 600x128 --workers 2
    python bench/bench_simulate.py --calibration         # added HU per ladder level and base slice
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Run ``cmd``; return (wall s, CPU s (user + system, workers included), peak RSS MiB of the process tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


LADDER = [(1.0, 1024), (0.5, 512), (0.3, 256), (0.2, 128), (0.1, 64), (1.0, 64), (0.1, 1024)]


def calibration(cache_dir: str | None) -> None:
    """Print, per base slice and ladder level, the added HU std over soft tissue: noise, streaks, both."""
    import numpy as np

    from ctiqa import simulation as sim

    print(f"added HU std over soft-tissue pixels (noise | streaks | total); expected noise = "
          f"{sim.FULL_DOSE_NOISE_HU} / sqrt(d*n/1024)")
    for bs in sim.BASE_SLICES:
        path = sim.base_slice_path(bs)
        if path is None:
            continue
        proj = sim.project_base_slice(bs, path, Path(cache_dir) if cache_dir else None)
        mask = sim.soft_tissue_mask(proj.hu)
        print(f"{bs.name}: {proj.hu.shape[0]} px (+{proj.margin} margin), {proj.spacing_mm:.3f} mm, I0 {proj.i0:.3g} "
              f"(I0 3e6 would give {proj.i0_fixed_noise_hu:.1f} HU)")
        pix = np.nonzero(mask)
        for dose, views in LADDER:
            idx = sim.view_indices(views)
            ang = sim.full_view_angles()[idx]
            total = sim.degrade(proj, dose, views, np.random.default_rng(0), pixels=pix)
            clean = proj.recon(proj.sinogram[:, idx], ang, pix)
            streak = sim.mu_to_hu_difference(clean - proj.reference[pix])
            print(f"  dose {dose:4.2f} views {views:5d} score {sim.synthetic_score(dose, views):3.1f}: "
                  f"noise {np.std(total - streak):6.1f} | streaks {np.std(streak):6.1f} | total {np.std(total):6.1f}"
                  f"   (expected noise {sim.expected_noise_hu(dose, views):6.1f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["20x256", "20x128"], help="N x SIZE pairs")
    ap.add_argument("--workers", type=int, default=None, help="ctiqa simulate --workers (default: its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", action="store_true", help="print the noise/streak table instead")
    ap.add_argument("--cache-dir", default=None, help="sinogram cache for --calibration")
    args = ap.parse_args()
    if args.calibration:
        calibration(args.cache_dir)
        return
    cpus = len(os.sched_getaffinity(0))
    print(f"ctiqa simulate benchmark: {cpus} CPU(s) available, load average {os.getloadavg()[0]:.2f}")
    print(f"{'config':>9} {'cache':>5} {'wall s':>8} {'CPU s':>8} {'wall s/image':>13} {'peak MiB':>9}")
    for cfg in args.configs:
        n, size = (int(v) for v in cfg.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            for label in ("cold", "warm"):
                cmd = [sys.executable, "-m", "ctiqa.cli", "simulate", "--out", str(Path(tmp) / label),
                       "--n-images", str(n), "--size", str(size), "--seed", str(args.seed), "--cache-dir", str(cache)]
                if args.workers is not None:
                    cmd += ["--workers", str(args.workers)]
                wall, cpu, peak = run(cmd)
                print(f"{cfg:>9} {label:>5} {wall:8.1f} {cpu:8.1f} {wall / n:13.2f} {peak:9.0f}", flush=True)


if __name__ == "__main__":
    main()
