"""Slices per second: in-process scoring vs the same model behind ``transformers serve``, at concurrency 1 and 8.

    python bench/bench_serving.py [--model DIR] [--images 16] [--max-new-tokens 64] [--batch-size 4]

Default model: a freshly built tiny Gemma 3 (ctiqa.tiny; random weights never emit EOS, so every answer runs the
full ``--max-new-tokens`` budget and both paths do the same work). Pass ``--model runs/demo/model`` for the
trained demo model. In-process: :func:`ctiqa.inference.predict_images` (batched greedy generation + probability
score). Server: ``transformers serve MODEL`` (fp32, CPU, 127.0.0.1) and :class:`ctiqa.serving.ServerScorer`
(no cache; ``transformers serve`` returns no log-probabilities, so parsed scores only). Prints slices/s of each and
the ratio server / in-process. Needs the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: a new tiny model)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4, help="in-process batch size")
    args = ap.parse_args()

    from ctiqa.inference import load_model, predict_images
    from ctiqa.serving import ServerScorer
    from ctiqa.testing.loopback import transformers_serve
    from ctiqa.tiny import build_tiny_model

    tmp = tempfile.mkdtemp(prefix="bench_serving_")
    model = args.model or str(build_tiny_model(Path(tmp) / "tiny", seed=0))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)) for _ in range(args.images)]

    lm = load_model(model, precision="fp32")
    predict_images(lm, images[:1], max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    predict_images(lm, images, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    local = args.images / (time.perf_counter() - t0)
    del lm

    rates = {}
    with transformers_serve(model, timeout_s=300) as url:
        for conc in (1, 8):
            scorer = ServerScorer(url, model, max_new_tokens=args.max_new_tokens, concurrency=conc, cache=False,
                                  probability=False)
            scorer(images[:1])  # warm-up (the server loads processor state on the first request)
            t0 = time.perf_counter()
            scorer(images)
            rates[conc] = args.images / (time.perf_counter() - t0)
            scorer.close()
    print(f"model {model}, {args.images} slices, {args.max_new_tokens} new tokens, CPU threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"in-process (batch {args.batch_size}):  {local:6.2f} slices/s")
    for conc, r in rates.items():
        print(f"server, concurrency {conc}:    {r:6.2f} slices/s   ratio server/in-process {r / local:.2f}")


if __name__ == "__main__":
    main()
