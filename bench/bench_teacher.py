"""Teacher throughput: concurrency 16 vs 1 against a local fake Gemini server with 1 s latency per answer.

Runs the real pipeline: :func:`datasets_builder.build.annotate` -> :class:`LLMTeacher` -> :class:`GeminiClient`
-> google-genai SDK -> HTTP -> :mod:`ctiqa.testing.fake_gemini` in a separate process (threaded, every answer delayed
``--latency`` seconds),
with the on-disk answer cache (append + fsync per answer) in a fresh temporary file for each run.

    python bench/bench_teacher.py [--items 32] [--latency 1.0] [--concurrency 16]

Prints images/s at concurrency 1 and N and their ratio (ideal: N, bounded by items / N rounds of latency).
Each request also costs some CPU (PNG decode, base64 + JSON in the SDK); the PNG is not encoded again (the
item's bytes are sent as they are). ``--size 64`` shows the network-bound figure.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ctiqa.clients import GeminiClient
from ctiqa.imaging import image_sha256
from ctiqa.prompts import PROMPT_VERSION
from datasets_builder.build import Item, annotate
from datasets_builder.cache import AnswerCache
from datasets_builder.teachers import LLMTeacher


def make_items(n: int, size: int = 512) -> list[Item]:
    """``n`` distinct RGB images: a smooth disc plus Gaussian noise (sigma 12 grey levels), like a noisy CT slice."""
    rng = np.random.default_rng(0)
    items = []
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    body = np.where(xx**2 + yy**2 < 0.2, 120.0, 10.0) + 40 * xx
    for k in range(n):
        grey = np.clip(body + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)
        im = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        items.append(Item(id=f"{k:04d}", split="train", score=round(4 * k / max(1, n - 1), 1), metadata=None,
                          png=buf.getvalue(), sha=image_sha256(im)))
    return items


def run(url: str, items: list[Item], concurrency: int) -> tuple[float, int]:
    teacher = LLMTeacher(GeminiClient("gemini-2.5-pro", api_key="bench-key", base_url=url))
    with tempfile.TemporaryDirectory() as tmp:
        cache = AnswerCache(Path(tmp) / "cache.jsonl")

        async def go():
            try:
                return await annotate(items, teacher, cache, concurrency=concurrency, prompt_version=PROMPT_VERSION,
                                      progress=False)
            finally:
                await teacher.aclose()

        t0 = time.perf_counter()
        stats = asyncio.run(go())
        seconds = time.perf_counter() - t0
        cache.close()
    return seconds, stats.new_ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512: LDCTIQA; 64: network only)")
    a = ap.parse_args()
    items = make_items(a.items, a.size)
    # the server runs in its own process so that its JSON/base64 work does not share our GIL
    server = subprocess.Popen([sys.executable, "-m", "ctiqa.testing.fake_gemini", "--latency", str(a.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        results = {}
        for c in (1, a.concurrency):
            for it in items:
                it.result = None
            seconds, n_ok = run(url, items, c)
            results[c] = a.items / seconds
            print(f"concurrency {c:>3}: {a.items} images ({n_ok} ok) in {seconds:6.2f} s -> {results[c]:6.2f} images/s")
    finally:
        server.terminate()
        server.wait()
    ideal = min(a.concurrency, a.items)
    print(f"speed-up concurrency {a.concurrency} vs 1: {results[a.concurrency] / results[1]:.1f}x "
          f"(ideal {ideal}x; latency {a.latency} s per answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
