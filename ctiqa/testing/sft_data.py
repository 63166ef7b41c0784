"""A small chat-format CT-quality dataset in the schema `ctiqa build-dataset` writes, for the SFT tests.

Images are 64x64 RGB: a smooth disc ("body") plus Gaussian noise whose std falls with the score, so a model can
learn the task. Saved as a Hub-layout folder (``data/<split>-00000-of-00001.parquet`` + ``README.md``) that
``datasets.load_dataset(folder)`` reads exactly as from the Hub.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ctiqa import prompts


def ct_like_image(score: float, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A grey disc on black with noise std 60 - 12*score (uint8 grey levels), as an RGB PIL image."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2) * 120.0 + 20.0
    noisy = disc + rng.normal(0.0, 60.0 - 12.0 * score, disc.shape)
    grey = np.clip(noisy, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


def rows(n: int, rng: np.random.Generator, fmt: str = "score-first", offset: int = 0) -> list[dict]:
    """``n`` examples in the dataset schema (scores multiples of 0.2 in [0, 4])."""
    out = []
    for i in range(n):
        score = round(float(rng.integers(0, 21)) * 0.2, 1)
        rationale = (f"The image shows {'marked' if score < 2 else 'mild'} noise and "
                     f"{'blurred' if score < 2 else 'sharp'} organ edges.")
        target = prompts.format_target(score, rationale, fmt)
        out.append({
            "id": f"{offset + i:04d}",
            "score": score,
            "prompt": prompts.prompt_messages(fmt),
            "completion": prompts.completion_messages(target),
            "images": [ct_like_image(score, rng)],
            "rationale": rationale,
            "teacher": "template",
            "prompt_version": prompts.PROMPT_VERSION,
            "target_format": fmt,
        })
    return out


def write_dataset(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0, fmt: str = "score-first") -> Path:
    """Write a Hub-layout dataset folder with splits ``sizes`` (default train 16, validation 4, test 4)."""
    from datasets import Dataset, DatasetDict, Features, List, Value
    from datasets import Image as ImageFeature

    sizes = sizes or {"train": 16, "validation": 4, "test": 4}
    rng = np.random.default_rng(seed)
    msg = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    features = Features({
        "id": Value("string"), "score": Value("float64"), "prompt": msg, "completion": msg,
        "images": List(ImageFeature()), "rationale": Value("string"), "teacher": Value("string"),
        "prompt_version": Value("string"), "target_format": Value("string"),
    })
    offset = 0
    dd = {}
    for split, n in sizes.items():
        dd[split] = Dataset.from_list(rows(n, rng, fmt, offset), features=features)
        offset += n
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, ds in DatasetDict(dd).items():
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    (folder / "README.md").write_text("---\nlicense: other\n---\n# test dataset for ctiqa SFT tests\n")
    return folder
