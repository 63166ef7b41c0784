"""Training speed and peak memory of the tiny recipes on the CPU, through the real script.

    python bench/bench_train.py [--dataset runs/demo/dataset] [--steps 40] [--recipes qlora full] [--workers 0 1]

Builds the tiny model (``ctiqa tiny-model``), then runs ``accelerate launch --cpu recipes/sft.py`` with the tiny
recipes (``config_cpu.yaml``: the demo's full fine-tuning; ``config_qlora_cpu.yaml``: QLoRA) for ``--steps`` optimiser
steps (no evaluation, no checkpoints, no example check) and prints examples/s, tokens/s (real tokens of the
batches, from TRL's ``num_tokens``), seconds per step, the whole command's wall time and its peak resident memory. Dataset: ``--dataset`` (e.g. the demo's, from ``ctiqa build-dataset``), else a small
synthetic one in the same schema (:mod:`ctiqa.testing.sft_data`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: name -> tiny recipe (full: the demo's, every weight trained, fp32; qlora: 4-bit base + LoRA)
RECIPES = {
    "full": REPO / "recipes" / "tiny" / "sft" / "config_cpu.yaml",
    "qlora": REPO / "recipes" / "tiny" / "sft" / "config_qlora_cpu.yaml",
}


def run_recipe(recipe: Path, model: Path, dataset: Path, out: Path, steps: int, workers: int) -> dict:
    """Train ``steps`` steps with ``recipe``; return speed and memory figures."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           str(REPO / "recipes" / "sft.py"), "--config", str(recipe),
           "--dataloader_num_workers", str(workers), "--model_name_or_path", str(model),
           "--dataset_name", str(dataset), "--output_dir", str(out), "--max_steps", str(steps),
           "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
           "--report_to", "none", "--logging_steps", "1", "--check_examples", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{recipe.name} failed:\n{proc.stderr.read()[-3000:]}")
    metrics = json.loads((out / "train_results.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    tokens = max(h.get("num_tokens", 0) for h in history)
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "examples_per_s": metrics["train_samples_per_second"],
        "tokens_per_s": tokens / metrics["train_runtime"],
        "s_per_step": metrics["train_runtime"] / steps,
        "train_s": metrics["train_runtime"],
        "command_wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,
        "loss_first_last": (losses[0], losses[-1]) if losses else (float("nan"), float("nan")),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=None, help="dataset folder (default: small synthetic)")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per recipe (default 40)")
    ap.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="dataloader workers to try (default 1)")
    args = ap.parse_args(argv)

    from ctiqa.tiny import build_tiny_model, count_parameters

    with tempfile.TemporaryDirectory(prefix="ctiqa-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model = build_tiny_model(tmp / "tiny-model", seed=0)
        build_s = time.perf_counter() - t0
        from transformers import AutoModelForImageTextToText

        counts = count_parameters(AutoModelForImageTextToText.from_pretrained(model))
        dataset = args.dataset
        if dataset is None:
            from ctiqa.testing.sft_data import write_dataset

            dataset = write_dataset(tmp / "dataset", {"train": 128, "validation": 8, "test": 8})
        print(f"tiny model: {counts['total'] / 1e6:.3f} M parameters (vision {counts['vision'] / 1e6:.3f} M, "
              f"text {counts['text'] / 1e6:.3f} M), built in {build_s:.2f} s; dataset {dataset}; "
              f"{args.steps} steps per recipe; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
        print(f"{'recipe':<8} {'workers':>7} {'examples/s':>10} {'tokens/s':>9} {'s/step':>7} {'train s':>8} {'wall s':>7} "
              f"{'peak RSS MiB':>12}  loss first -> last")
        for name in args.recipes:
            for w in args.workers:
                r = run_recipe(RECIPES[name], model, dataset, tmp / f"out-{name}-{w}", args.steps, w)
                print(f"{name:<8} {w:>7} {r['examples_per_s']:>10.2f} {r['tokens_per_s']:>9.0f} {r['s_per_step']:>7.3f} "
                      f"{r['train_s']:>8.1f} {r['command_wall_s']:>7.1f} {r['peak_rss_mib']:>12.0f}  "
                      f"{r['loss_first_last'][0]:.3f} -> {r['loss_first_last'][1]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
