"""The offline end-to-end demo behind ``make demo`` (CPU, no network, real CT).

Stages (each a real command, timed, skipped on a re-run when its output is complete):

1. ``ctiqa simulate``        mini-LDCTIQA from the real CT slices pydicom / pydicom-data ship (synthetic scores;
                             the test split is a base slice never seen in training)
2. ``ctiqa tiny-model``      a tiny random Gemma 3 VLM + processor, built offline
3. ``ctiqa build-dataset``   template teacher -> chat-format dataset (Hub-layout folder)
4. ``accelerate launch recipes/sft.py --config recipes/tiny/sft/config_cpu.yaml``
5. ``ctiqa evaluate``        the trained model, the untrained model and a noise-σ baseline on the test split
6. ``ctiqa report``          Table-1-style comparison -> ``runs/demo/report.md``

Outputs: ``runs/demo/`` holds the trained model's evaluation (``results.json``, ``predictions.jsonl``, plots),
``runs/demo/baselines/<name>/`` the baselines', ``runs/demo/report.md`` and ``runs/demo/stages.json`` (stage
times in seconds and peak resident memory in MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ctiqa.evaluation import RESULTS_FILE
from ctiqa.ldctiqa import DEGRADATIONS_FILE
from ctiqa.model_settings import DONE_FILE

#: The checkout the demo runs in: the current folder (``make demo`` runs from the checkout root). The demo needs the
#: checkout's ``recipes/``, so it refuses to start elsewhere (e.g. from a non-editable install).
REPO = Path.cwd()
#: The demo's folders, relative to the checkout (the current folder): the package may be installed anywhere (a
#: non-editable ``pip install .``), the demo's outputs live in the checkout it ran in.
DEMO_DIR = Path("runs") / "demo"
#: The model ``make demo`` trains (``ctiqa predict`` and ``ctiqa app`` use it when no model is given).
DEMO_MODEL = DEMO_DIR / "model"
#: The dataset ``make demo`` builds.
DEMO_DATASET = DEMO_DIR / "dataset"
#: Stage times (s) and peak memory (MiB) of a demo run, in its output folder (read by bench/bench_demo.py).
STAGES_FILE = "stages.json"
#: demo sizes: ~600 crops of 128 px (issue 6 prototype figures), seed fixed.
N_IMAGES = 600
CROP_PX = 128
SEED = 0


def run_command(cmd: list[str]) -> float:
    """Run one command from the repo root; return its peak resident memory in MiB (its process tree's largest).

    Raises:
        subprocess.CalledProcessError: the command failed (the demo stops; a re-run resumes at this stage).
    """
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss / 1024.0  # Linux: KiB


def ctiqa_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctiqa.cli", *args]


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the demo. Returns 0 on success; a failing stage raises CalledProcessError."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / DEMO_DIR)
    ap.add_argument("--n-images", type=int, default=N_IMAGES)
    ap.add_argument("--config", default="recipes/tiny/sft/config_cpu.yaml")
    args = ap.parse_args(argv)
    if not (REPO / "recipes" / "sft.py").is_file():
        ap.error(f"run the demo from a ctiqa checkout (`make demo`): {REPO} has no recipes/sft.py")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})

    sim, tiny, data, model = out / "ldctiqa-sim", out / "tiny-model", out / "dataset", out / "model"
    stages_file = out / STAGES_FILE
    stages = json.loads(stages_file.read_text()) if stages_file.exists() else {}

    def stage(name: str, done: Path, cmds: list[list[str]]) -> None:
        if done.exists():
            print(f"[demo] {name}: done already ({done.relative_to(REPO) if done.is_relative_to(REPO) else done})")
            return
        print(f"\n[demo] === {name} ===", flush=True)
        t0 = time.perf_counter()
        peak = max(run_command(c) for c in cmds)
        stages[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(peak, 1)}
        stages_file.write_text(json.dumps(stages, indent=2))
        print(f"[demo] {name}: {stages[name]['seconds']} s")

    stage("simulate", sim / DEGRADATIONS_FILE,
          [ctiqa_command("simulate", "--out", str(sim), "--n-images", str(args.n_images), "--size", str(CROP_PX),
                         "--seed", str(SEED))])
    stage("tiny-model", tiny / "config.json", [ctiqa_command("tiny-model", "--out", str(tiny), "--seed", str(SEED))])
    # runs only while no finished dataset is there (README.md is written last): --overwrite moves aside at most an
    # unfinished build of other or unknown settings (an older ctiqa's), which build-dataset would otherwise refuse
    stage("build-dataset", data / "README.md",
          [ctiqa_command("build-dataset", "--ldctiqa", str(sim), "--teacher", "template", "--split", "base-slice",
                         "--seed", str(SEED), "--out", str(data), "--overwrite")])
    stage("train", model / DONE_FILE,
          [[sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_cpu_threads_per_process", "1",
            "recipes/sft.py", "--config", args.config, "--model_name_or_path", str(tiny),
            "--dataset_name", str(data), "--output_dir", str(model)]])
    trained = model
    stage("evaluate-trained", out / RESULTS_FILE,
          [ctiqa_command("evaluate", "--model", str(trained), "--dataset", str(data), "--split", "test", "--out", str(out))])
    stage("evaluate-untrained", out / "baselines" / "untrained" / RESULTS_FILE,
          [ctiqa_command("evaluate", "--model", str(tiny), "--dataset", str(data), "--split", "test",
                         "--out", str(out / "baselines" / "untrained"))])
    noise_dir = out / "baselines" / "noise-sigma"
    stage("evaluate-noise-sigma", noise_dir / RESULTS_FILE,
          [[sys.executable, "-m", "ctiqa.baselines", str(data), str(noise_dir / "predictions-input.jsonl")],
           ctiqa_command("evaluate", "--predictions", str(noise_dir / "predictions-input.jsonl"), "--dataset", str(data),
                         "--split", "test", "--out", str(noise_dir))])
    report = out / "report.md"
    report.unlink(missing_ok=True)
    run_command(ctiqa_command("report", str(out), str(out / "baselines" / "untrained"), str(noise_dir),
                              "--names", "tiny VLM (fine-tuned)", "tiny VLM (untrained)", "noise-σ baseline",
                              "--out", str(report)))
    total = sum(v["seconds"] for v in stages.values())
    print("[demo] stage times (s): " + ", ".join(f"{k} {v['seconds']}" for k, v in stages.items())
          + f"; total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
