"""Cost of the dataset content fingerprint a training run records and checks on every start or resume
(:func:`ctiqa.model_settings.dataset_fingerprint`: SHA-256 of the data files ``load_dataset`` reads).

    python bench/bench_fingerprint.py [--dataset FOLDER] [--mb 300]

With ``--dataset``, times that folder; else writes a Hub-layout folder of ``--mb`` MB of random bytes split over
three parquet-named files (the fingerprint reads bytes, it does not parse them) in a temporary folder. Prints the
data size, seconds for the first call (files just written: in the page cache) and the best of three.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", help="a local dataset folder (default: a synthetic one)")
    ap.add_argument("--mb", type=int, default=300, help="size of the synthetic dataset in MB")
    args = ap.parse_args()
    from ctiqa.model_settings import dataset_data_files, dataset_fingerprint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dataset) if args.dataset else Path(tmp) / "ds"
        if not args.dataset:
            (folder / "data").mkdir(parents=True)
            for split, share in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
                (folder / "data" / f"{split}-00000-of-00001.parquet").write_bytes(
                    os.urandom(int(args.mb * share * 1e6)))
        files = dataset_data_files(folder) or {}
        size = sum(p.stat().st_size for ps in files.values() for p in ps)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            dataset_fingerprint(folder)
            times.append(time.perf_counter() - t0)
        print(f"{folder}: {sum(map(len, files.values()))} data files, {size / 1e6:.0f} MB; fingerprint "
              f"{times[0]:.2f} s first, {min(times[1:]):.2f} s best of 3 ({size / 1e6 / min(times[1:]):.0f} MB/s)")


if __name__ == "__main__":
    main()
