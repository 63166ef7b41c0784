"""Speed of the LDCTIQA reader on full-size data: load (TIFF headers) and validate (every pixel) + render.

Writes N float32 512x512 [0, 1] TIFFs (the LDCTIQA format, ~1 MiB each) to a temporary folder, then prints
seconds for load_ldctiqa (header checks), validate (full read) and render (soft-tissue RGB) per image.

    python bench/bench_ldctiqa.py [--n 1000] [--size 512]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from ctiqa.imaging import render
from ctiqa.ldctiqa import load_ldctiqa, validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "LDCTIQAG2023_train"
        (root / "image").mkdir(parents=True)
        labels = {}
        for i in range(args.n):
            tifffile.imwrite(root / "image" / f"{i:04d}.tif", rng.random((args.size, args.size), dtype=np.float32))
            labels[f"{i:04d}.tif"] = round(float(rng.integers(0, 21)) * 0.2, 1)
        (root / "train.json").write_text(json.dumps(labels))
        t0 = time.perf_counter()
        ds = load_ldctiqa(Path(tmp))
        t1 = time.perf_counter()
        rep = validate(ds)
        t2 = time.perf_counter()
        for i in ds.ids[:100]:
            render(ds.image_path(i))
        t3 = time.perf_counter()
    n_r = min(100, args.n)
    print(f"images: {args.n} x {args.size}^2 float32 (kind {rep.kind})")
    print(f"load_ldctiqa (labels + TIFF headers): {t1 - t0:.2f} s total, {1e3 * (t1 - t0) / args.n:.2f} ms/image")
    print(f"validate (read every pixel):          {t2 - t1:.2f} s total, {1e3 * (t2 - t1) / args.n:.2f} ms/image")
    print(f"read + render soft-tissue RGB:        {1e3 * (t3 - t2) / n_r:.2f} ms/image ({n_r} images)")


if __name__ == "__main__":
    main()
