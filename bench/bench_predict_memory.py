"""Peak memory of ``ctiqa predict``'s streaming pipeline at 200 vs 2,000 slices (memory flat in the slice count).

    python bench/bench_predict_memory.py [--sizes 200 2000] [--pixels 256] [--batch-size 4]

Writes one DICOM series of N slices (pydicom's CT_small.dcm resized to PIXELS x PIXELS, int16) to a temporary
folder, then in a fresh process for each N: ``gather_series`` (headers only) and ``score_series`` with a constant
scoring backend (no model: what is measured is reading, rendering, batching and writing rows to a JSONL file).
Prints, per N, the Python-heap peak (tracemalloc, numpy arrays included; a second run) and the process's peak
resident set (ru_maxrss) in MiB, and slices/s (reading, rendering and writing only; the run without tracemalloc). For comparison it also reads the whole folder at once with
``ctiqa.imaging.read_dicom_folder`` (what predict did before streaming).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, tracemalloc
from pathlib import Path
mode, folder, out, batch, trace = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
if trace:
    tracemalloc.start()
t0 = time.perf_counter()
if mode == "stream":
    from ctiqa.predict import RowSink, gather_series, score_series
    series = gather_series([folder])
    sink = RowSink(out, {"bench": 1}, False)
    counts = score_series(series, lambda images: [{"prob_score": 2.0, "prob_std": 0.1} for _ in images], sink,
                          encoding="soft-tissue", batch_size=batch)
    sink.close()
    n = counts["scored"]
else:
    from ctiqa.imaging import read_dicom_folder
    n = sum(len(s) for s in read_dicom_folder(folder))
seconds = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] if trace else 0
print(json.dumps({"n": n, "heap_mib": peak / 2**20, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "slices_per_s": n / seconds}))
"""


def write_series(folder: Path, n: int, pixels: int) -> None:
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    arr = src.pixel_array
    reps = max(1, pixels // arr.shape[0])
    big = np.kron(arr, np.ones((reps, reps), dtype=arr.dtype)).astype(arr.dtype)
    src.PixelData, src.Rows, src.Columns = big.tobytes(), big.shape[0], big.shape[1]
    src.SeriesInstanceUID = generate_uid()
    folder.mkdir(parents=True)
    for k in range(n):
        ds = src.copy()
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(k)], [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"{k:05d}.dcm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--pixels", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="ctiqa-bench-") as tmp:
        print(f"{args.pixels}x{args.pixels} int16 slices, batch {args.batch_size}, constant backend")
        for n in args.sizes:
            folder = Path(tmp) / f"s{n}"
            write_series(folder, n, args.pixels)
            for mode in ("stream", "read-all"):
                runs = []
                for trace in ("0", "1"):  # RSS and speed without tracemalloc (it slows allocations), heap with it
                    out = Path(tmp) / f"{n}-{trace}.jsonl"
                    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), str(out),
                                          str(args.batch_size), trace], capture_output=True, text=True, check=True,
                                         cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                                                        "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
                    runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
                r = {**runs[0], "heap_mib": runs[1]["heap_mib"]}
                label = "predict (streaming)" if mode == "stream" else "read_dicom_folder (all at once)"
                print(f"{n:6d} slices  {label:32s} heap peak {r['heap_mib']:8.1f} MiB   peak RSS "
                      f"{r['rss_mib']:8.1f} MiB   {r['slices_per_s']:7.1f} slices/s")


if __name__ == "__main__":
    main()
