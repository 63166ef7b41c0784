"""``make demo-rl``: GRPO after the demo's SFT, on the CPU, offline; SFT vs SFT + GRPO in one report.

Runs after ``make demo`` (it needs ``runs/demo/model``, ``runs/demo/dataset`` and the SFT model's evaluation in
``runs/demo``). Stages (each a real command, skipped on a re-run when its output is complete; a cut-short GRPO run
resumes from its last checkpoint):

1. ``accelerate launch recipes/grpo.py --config recipes/tiny/grpo/config_cpu.yaml`` -> ``runs/demo/rl/model``
2. ``ctiqa evaluate`` of that model on the test split -> ``runs/demo/rl``
3. ``ctiqa report`` SFT vs SFT + GRPO -> ``runs/demo/report-rl.md``, closed by the issue's targets, met or not.

Stage times go to ``runs/demo/rl/stages.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.demo import DEMO_DIR, REPO, STAGES_FILE, ctiqa_command, run_command
from ctiqa.evaluation import RESULTS_FILE
from ctiqa.model_settings import DONE_FILE

RECIPE = "recipes/tiny/grpo/config_cpu.yaml"


def targets(sft: dict[str, Any], rl: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """The targets of the RL issue on two ``results.json``: rows ``(target, SFT value, SFT + GRPO value, met)``.

    False streaks <= 0.10, severity agreement >= 0.85 (truth-based explanation check), SRCC (probability and
    parsed) not lower than the SFT model's, MAE (probability) <= 0.40. ``met`` is None when a value is missing.
    """
    def get(r: dict[str, Any], *path: str) -> float | None:
        for p in path:
            r = (r or {}).get(p)
        return r

    rows = []
    for label, path, ok in (
        ("false-streak rate <= 0.10", ("explanation_check", "false_streak_rate"), lambda a, b: b <= 0.10),
        ("severity agreement >= 0.85", ("explanation_check", "severity_match_rate"), lambda a, b: b >= 0.85),
        ("SRCC (probability) not lower than SFT", ("metrics", "probability", "srcc"), lambda a, b: b >= a),
        ("SRCC (parsed) not lower than SFT", ("metrics", "parsed", "srcc"), lambda a, b: b >= a),
        ("MAE (probability) <= 0.40", ("metrics", "probability", "mae"), lambda a, b: b <= 0.40),
        ("MAE (parsed) <= 0.40", ("metrics", "parsed", "mae"), lambda a, b: b <= 0.40),
    ):
        a, b = get(sft, *path), get(rl, *path)
        met = None if a is None or b is None else bool(ok(a, b))
        rows.append((label, "n/a" if a is None else f"{a:.3f}", "n/a" if b is None else f"{b:.3f}", met))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the RL stage of the demo. Returns 0; a failing stage raises CalledProcessError."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=REPO / DEMO_DIR, help="the demo's folder (make demo)")
    ap.add_argument("--config", default=RECIPE)
    args = ap.parse_args(argv)
    demo: Path = args.demo
    sft_model, data, rl = demo / "model", demo / "dataset", demo / "rl"
    for need in (sft_model / DONE_FILE, data / "README.md", demo / RESULTS_FILE):
        if not need.exists():
            raise CTIQAError(f"{need} is missing: run `make demo` first (demo-rl starts from its SFT model)")
    rl.mkdir(parents=True, exist_ok=True)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    stages_file = rl / STAGES_FILE
    stages = json.loads(stages_file.read_text()) if stages_file.exists() else {}

    def stage(name: str, done: Path, cmd: list[str]) -> None:
        if done.exists():
            print(f"[demo-rl] {name}: done already ({done})")
            return
        print(f"\n[demo-rl] === {name} ===", flush=True)
        t0 = time.perf_counter()
        peak = run_command(cmd)
        stages[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(peak, 1)}
        stages_file.write_text(json.dumps(stages, indent=2))
        print(f"[demo-rl] {name}: {stages[name]['seconds']} s")

    model = rl / "model"
    stage("grpo", model / DONE_FILE,
          [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           "--num_cpu_threads_per_process", "2", "recipes/grpo.py", "--config", args.config,
           "--model_name_or_path", str(sft_model), "--dataset_name", str(data), "--output_dir", str(model)])
    stage("evaluate-grpo", rl / RESULTS_FILE,
          ctiqa_command("evaluate", "--model", str(model), "--dataset", str(data), "--split", "test", "--out", str(rl)))
    report = demo / "report-rl.md"
    run_command(ctiqa_command("report", str(demo), str(rl), "--names", "tiny VLM (SFT)", "tiny VLM (SFT + GRPO)",
                              "--out", str(report)))
    rows = targets(json.loads((demo / RESULTS_FILE).read_text()), json.loads((rl / RESULTS_FILE).read_text()))
    lines = ["", "## Targets of the RL stage (test split; explanation figures: truth-based keyword rubric)", "",
             "| target | SFT | SFT + GRPO | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {a} | {b} | {'n/a' if m is None else 'yes' if m else 'no'} |" for t, a, b, m in rows]
    met = [t for t, _, _, m in rows if m]
    lines += ["", f"Met: {', '.join(met) if met else 'none'}. Recipe: `{args.config}`; GRPO rewards per step in "
              f"TensorBoard (`{model / 'runs'}`, `rewards/<name>/mean`).", ""]
    with report.open("a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    total = sum(v["seconds"] for v in stages.values())
    print("[demo-rl] stage times (s): " + ", ".join(f"{k} {v['seconds']}" for k, v in stages.items())
          + f"; total {total:.0f} s; report {report}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CTIQAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
