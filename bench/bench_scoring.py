"""Per-image time of the probability score (one forward pass + a 2-token pass) vs full greedy generation.

    python bench/bench_scoring.py [--model DIR] [--images 16] [--batch-size 4] [--max-new-tokens 256]

Default model: a freshly built tiny Gemma 3 (ctiqa.tiny; random weights never emit EOS, so generation runs the
full ``--max-new-tokens`` budget, like a ~200-word rationale). Pass ``--model runs/demo/model`` to time the
trained demo model. Prints ms per image for both paths and their ratio (CPU, torch threads as configured).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model or adapter folder (default: a new tiny model)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    args = ap.parse_args()

    from ctiqa.inference import generate_texts, load_model, probability_scores

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from ctiqa.tiny import build_tiny_model

        model = str(build_tiny_model(f"{tmp.name}/tiny"))
    lm = load_model(model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)) for _ in range(args.images)]
    probability_scores(lm, images[: args.batch_size], batch_size=args.batch_size)  # warm-up
    generate_texts(lm, images[: args.batch_size], max_new_tokens=4, batch_size=args.batch_size)

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) / len(images) * 1000.0

    t_prob = best(lambda: probability_scores(lm, images, batch_size=args.batch_size))
    t_gen = best(lambda: generate_texts(lm, images, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
    print(f"model {model}  images {len(images)}  batch {args.batch_size}  torch threads {torch.get_num_threads()}")
    print(f"probability score : {t_prob:8.1f} ms/image")
    print(f"generation        : {t_gen:8.1f} ms/image  (greedy, max_new_tokens {args.max_new_tokens}; an untrained "
          "model uses all of it)")
    print(f"ratio generation / probability: {t_gen / t_prob:.1f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
