"""A tiny Gemma 3 taught the ctiqa answer format in a few seconds, for tests that need real-looking answers.

:func:`train_tiny` builds the random tiny model (:func:`ctiqa.tiny.build_tiny_model`) and fine-tunes all its
weights with a plain AdamW loop on a few examples of ``ctiqa/testing/sft_data.py`` (loss on the answer tokens only), until
greedy answers read ``Score: d.d`` followed by a rationale, so parsed and probability scores are real numbers. Not
the SFT recipe (tests/test_sft.py covers that): a stand-in for the demo's trained model that CI can make in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctiqa.testing.sft_data import rows


def train_tiny(out: Path, *, steps: int = 60, n_examples: int = 8, seed: int = 0, lr: float = 3e-3) -> Path:
    """Write a fine-tuned tiny model + processor to ``out`` (a full model folder) and return it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ctiqa.tiny import build_tiny_model

    base = build_tiny_model(Path(str(out) + "-base"), seed=seed)
    processor = AutoProcessor.from_pretrained(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    examples = rows(n_examples, np.random.default_rng(seed))
    prompts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
               for r in examples]
    texts = [processor.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in examples]
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=[r["images"] for r in examples], padding=True, return_tensors="pt",
                      add_special_tokens=False)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for i, p in enumerate(prompts):
        labels[i, :len(processor.tokenizer(p, add_special_tokens=False)["input_ids"])] = -100
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(out)
    return out
