"""Benchmark: the offline demo's stage times and peak memory.

    python bench/bench_demo.py                 # print the figures of the last `make demo` (runs/demo/stages.json)
    python bench/bench_demo.py --fresh DIR     # run the whole demo into DIR first (≈10-20 min on 2 cores)

Peak memory is the largest resident set of each stage's process tree (os.wait4 ru_maxrss), in MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ctiqa.demo import DEMO_DIR, STAGES_FILE

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", type=Path, help="run the demo into this (new) folder first")
    args = ap.parse_args()
    out = args.fresh or REPO / DEMO_DIR
    if args.fresh:
        subprocess.run([sys.executable, "-m", "ctiqa.demo", "--out", str(out)], check=True, cwd=REPO)
    stages_file = out / STAGES_FILE
    if not stages_file.exists():
        print(f"no {stages_file}: run `make demo` first or pass --fresh DIR", file=sys.stderr)
        return 1
    stages = json.loads(stages_file.read_text())
    print(f"{'stage':<24}{'seconds':>10}{'peak RSS MiB':>14}")
    for name, v in stages.items():
        print(f"{name:<24}{v['seconds']:>10.1f}{v['peak_rss_mib']:>14.0f}")
    print(f"{'total':<24}{sum(v['seconds'] for v in stages.values()):>10.1f}"
          f"{max(v['peak_rss_mib'] for v in stages.values()):>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
