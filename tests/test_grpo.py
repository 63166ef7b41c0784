"""recipes/grpo.py: reward binding, reference findings, recipes, a real 2-step GRPO run, resume after a kill.

Runs for real on the CPU: the tiny Gemma 3 (ctiqa.tiny), taught the answer format by a few SFT steps (a random
model never writes ``Score: x.x``, so every reward would tie and GRPO would have no signal), then trained with
GRPO on a small dataset in the schema of ``ctiqa build-dataset`` with the simulator's dose and view columns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctiqa import CTIQAError, rewards
from ctiqa.testing import load_script, wait_for_lock_release
from ctiqa.testing.sft_data import write_dataset
from ctiqa.tiny import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
GRPO = REPO / "recipes" / "grpo.py"
TINY_RECIPE = REPO / "recipes" / "tiny" / "grpo" / "config_cpu.yaml"
RECIPES = sorted(REPO.glob("recipes/*/grpo/config_*.yaml"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


grpo = load_script(GRPO, "ctiqa_recipe_grpo")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """The SFT tests' dataset plus the simulator's columns (dose_fraction, n_views) so truth findings exist."""
    from datasets import load_dataset

    root = tmp_path_factory.mktemp("data")
    src = load_dataset(str(write_dataset(root / "src", {"train": 24, "validation": 8, "test": 4})))
    out = root / "ds"
    (out / "data").mkdir(parents=True)
    for split, ds in src.items():
        n = len(ds)
        ds = ds.add_column("dose_fraction", [round(0.1 + 0.9 * (i % 4) / 3, 3) for i in range(n)])
        ds = ds.add_column("n_views", [(64, 200, 600, 1024)[i % 4] for i in range(n)])
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    (out / "README.md").write_text("---\nlicense: other\n---\n# test dataset for ctiqa GRPO tests\n")
    return out


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, dataset_dir):
    """The tiny model after 30 SFT steps: it answers ``Score: x.x\\nReasoning: ...`` (about 30 s on one core)."""
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    root = tmp_path_factory.mktemp("sft")
    tiny = build_tiny_model(root / "tiny", seed=0)
    args = SFTConfig(output_dir=str(root / "model"), use_cpu=True, bf16=False, max_steps=30,
                     per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
                     report_to="none", save_strategy="no", max_length=None, seed=0)
    trainer = SFTTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32), args=args,
                         train_dataset=load_dataset(str(dataset_dir))["train"],
                         processing_class=AutoProcessor.from_pretrained(tiny))
    trainer.train()
    trainer.save_model(str(root / "model"))
    return root / "model"


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(GRPO), "--config", str(TINY_RECIPE), *args]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ fast
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_parses_and_names_known_rewards(recipe):
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless use_cpu is set
    script_args, training_args, _ = grpo.parse_args(["--config", str(recipe), "--use_cpu", "true"])
    assert set(script_args.reward_funcs) <= set(rewards.REWARDS)
    assert len(training_args.reward_weights) == len(script_args.reward_funcs)
    assert training_args.max_completion_length >= 128  # the demo's targets are up to 130 tokens
    assert script_args.dataset_test_split != "test"
    assert recipe.read_text().startswith("# Hardware:")


def test_reward_functions_bind_yaml_parameters_under_their_own_names():
    from trl.trainer.utils import get_callable_name

    script_args, _, _ = grpo.parse_args(["--config", str(TINY_RECIPE), "--score_tau", "0.15",
                                         "--reward_funcs", "score_reward", "ranking_reward"])
    funcs = grpo.reward_functions(script_args)
    assert [get_callable_name(f) for f in funcs] == ["score_reward", "ranking_reward"]  # TensorBoard names
    assert funcs[0](["Score: 2.0\nReasoning: x"], score=[2.3]) == pytest.approx([0.1353352832])  # exp(-0.3/0.15)
    script_args.reward_funcs = ["no_such_reward"]
    with pytest.raises(CTIQAError, match="no_such_reward"):
        grpo.reward_functions(script_args)
    # QA round 4: a bad tau surfaced as a 51-line traceback at the first reward call, after the model had loaded
    script_args.reward_funcs, script_args.score_tau = ["score_reward"], -1.0
    with pytest.raises(CTIQAError, match=r"--score_tau must be > 0, got -1.0"):
        grpo.reward_functions(script_args)


def test_reference_findings_from_truth_and_from_dataset_columns(dataset_dir):
    from datasets import load_dataset

    train = load_dataset(str(dataset_dir))["train"]
    with_truth, source = grpo.add_reference_findings(train, "auto")
    assert source == "truth"
    row = with_truth[0]  # dose 0.1, 64 views: 9 HU / sqrt(0.1 * 64 / 1024) = 114 HU
    assert (row["noise_severity"], row["streaks"], row["streak_severity"]) == ("severe", True, "severe")
    row = with_truth[3]  # full dose, 1024 views
    assert (row["noise_severity"], row["streaks"], row["streak_severity"]) == ("none", False, None)
    # a dataset that already carries measured findings keeps them under "measured"
    measured = train.add_column("noise_severity", ["mild"] * len(train)).add_column("streaks", [True] * len(train))
    kept, source = grpo.add_reference_findings(measured, "measured")
    assert source.startswith("measured") and kept[0]["noise_severity"] == "mild" and kept[0]["streak_severity"] is None
    with pytest.raises(CTIQAError, match="simulator"):
        grpo.add_reference_findings(train.remove_columns(["n_views"]), "truth")


@pytest.mark.parametrize("extra, message", [
    (["--beta=-1"], r"^beta -1.0: must be a finite number >= 0 \(the KL weight; 0: no KL term\)$"),
    (["--beta", "nan"], r"^beta nan: must be a finite number >= 0"),
    (["--temperature", "0"], r"^temperature 0.0: must be a finite number > 0$"),
    (["--top_p", "1.5"], r"^top_p 1.5: must be in \(0, 1\]$"),
    (["--max_completion_length", "0"], r"^max_completion_length 0: must be an integer >= 1"),
    (["--epsilon", "0"], r"^epsilon 0.0: must be a finite number > 0"),
    (["--num_iterations", "0"], r"^num_iterations 0: must be an integer >= 1$"),
    (["--hub_token", "hf_SECRETCLI_q9"], r"^hub_token: a token is never taken from the command line or a recipe .*"
                                         r"set HF_TOKEN or run `hf auth login`"),
])
def test_grpo_settings_out_of_range_or_a_token_are_refused_before_anything(extra, message, tmp_path):
    """QA round 9, rows 72 and 79: `--beta -1` (a negative KL weight: the policy pushed away from its start) was
    accepted and trained; `--hub_token` was written in plain text into training_args.bin. GRPOConfig's numbers with
    an obvious range are in the one table of ctiqa.training.check_numbers; a token is refused."""
    out = tmp_path / "out"
    with pytest.raises(CTIQAError, match=message) as e:
        grpo.main(*grpo.parse_args(["--config", str(TINY_RECIPE), "--output_dir", str(out), *extra]))
    assert "SECRETCLI" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--dataset_train_split", "test"], r"^dataset_train_split test: the 'test' split is held out for `ctiqa "
                                        r"evaluate`, which reports on it"),
    (["--dataset_test_split", "test", "--eval_strategy", "steps", "--eval_steps", "2"],
     r"^dataset_test_split test: that argument names the split evaluated during training and used for model "
     r"selection; the 'test' split is held out for `ctiqa evaluate`"),
], ids=["train-on-test", "eval-on-test"])
def test_grpo_never_trains_or_evaluates_on_the_test_split(extra, message, tmp_path):
    """QA round 9, row 114 (GRPO side): `--dataset_train_split test` trained on the test images, exit 0. Refused in
    one line before anything loads (the model and dataset here do not exist), nothing written."""
    with pytest.raises(CTIQAError, match=message):
        grpo.main(*grpo.parse_args(["--config", str(TINY_RECIPE), "--model_name_or_path", str(tmp_path / "no-model"),
                                    "--dataset_name", str(tmp_path / "no-data"),
                                    "--output_dir", str(tmp_path / "out"), *extra]))
    assert list(tmp_path.iterdir()) == []


def test_a_second_grpo_launch_into_a_running_runs_output_dir_is_refused(tmp_path):
    """QA round 9, row 122 (GRPO side): the output_dir of a running run is locked (`<output_dir>.lock`); a second
    launch is refused in one line before it writes anything."""
    from ctiqa.testing import lock_held_elsewhere

    out = Path(os.path.realpath(tmp_path)) / "out"
    with lock_held_elsewhere(out), pytest.raises(CTIQAError, match=rf"^output_dir {out}: another recipes/grpo.py "
                                                                   r"run is writing it"):
        grpo.main(*grpo.parse_args(["--config", str(TINY_RECIPE), "--model_name_or_path", str(tmp_path / "m"),
                                    "--output_dir", str(out)]))
    assert not out.exists()


def test_an_sft_checkpoint_is_not_resumed_as_this_grpo_run(tiny, dataset_dir, tmp_path, monkeypatch):
    """QA round 9, row 92 (GRPO side): --resume_from_checkpoint of another run's checkpoint is refused naming the
    recipe kind; the same GRPO run's checkpoint in another folder is taken."""
    from ctiqa import training

    class Loading(Exception):
        pass

    def stop(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(training, "load_recipe_dataset", stop)  # what comes after the guard

    def main(out: Path, *extra: str):
        grpo.main(*grpo.parse_args(["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny),
                                    "--dataset_name", str(dataset_dir), "--output_dir", str(out),
                                    "--max_steps", "8", *extra]))

    with pytest.raises(Loading):
        main(tmp_path / "same")  # records this run
    record = json.loads((tmp_path / "same" / training.RUN_CONFIG_FILE).read_text())
    for name, rec in (("same", record), ("sft", {**record, "recipe": "sft"})):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / training.RUN_CONFIG_FILE).write_text(json.dumps(rec))
        ckpt = tmp_path / name / "checkpoint-4"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4, "epoch": 0.2}))
        (ckpt / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(CTIQAError, match=r"checkpoint-4 is a checkpoint of another run \(recipe 'sft' -> 'grpo'\)"):
        main(tmp_path / "new", "--resume_from_checkpoint", str(tmp_path / "sft" / "checkpoint-4"))
    assert not (tmp_path / "new").exists()
    with pytest.raises(Loading):
        main(tmp_path / "new", "--resume_from_checkpoint", str(tmp_path / "same" / "checkpoint-4"))


# ------------------------------------------------------------------------------------------------ real runs
def test_a_rerun_asking_no_more_steps_than_done_is_refused_before_loading_anything(tiny, dataset_dir, tmp_path,
                                                                                  monkeypatch):
    """GRPO shares SFT's run guard (ctiqa.training.prepare_output_dir): into its own finished folder, fewer steps
    than done are refused, as many are "nothing to do", files untouched; more go on to train (here: to the data
    loading, stopped there). Before the fix the first re-run went on to train past the finished step."""
    from ctiqa import training

    class Loading(Exception):
        pass

    def stop(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(training, "load_recipe_dataset", stop)  # what comes after the guard
    out = tmp_path / "rl"

    def main(steps: str):
        grpo.main(*grpo.parse_args(["--config", str(TINY_RECIPE), "--model_name_or_path", str(tiny),
                                    "--dataset_name", str(dataset_dir), "--output_dir", str(out),
                                    "--max_steps", steps]))

    with pytest.raises(Loading):
        main("2")  # records the run (ctiqa_run.json); then its 2 steps finished, as the Trainer leaves them
    state = json.dumps({"global_step": 2, "epoch": 0.1, "max_steps": 2}).encode()
    files = {"checkpoint-2/trainer_state.json": state, "trainer_state.json": state, "DONE": b"{}\n",
             "model.safetensors": b"weights", "README.md": b"# card: 2 steps\n"}
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    before = {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    with pytest.raises(CTIQAError, match=rf"^{out} holds this run trained to 2 steps .*--max_steps 1 asks for fewer"):
        main("1")
    with pytest.raises(training.AlreadyTrained, match="already trained to 2 steps"):
        main("2")
    assert {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == before
    with pytest.raises(Loading):
        main("3")  # a longer run continues it


@pytest.mark.slow  # ~1.5 min on one busy core (30 SFT steps to learn the format, then 2 GRPO steps)
def test_two_grpo_steps_change_the_weights_and_save_a_loadable_model(sft_model, dataset_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "rl"
    _run(_cmd("--model_name_or_path", str(sft_model), "--dataset_name", str(dataset_dir), "--output_dir", str(out),
              "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
              "--max_completion_length", "32", "--save_strategy", "no", "--logging_steps", "1",
              "--learning_rate", "1e-3"))
    before, after = _weights(sft_model), _weights(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no weight changed in 2 GRPO steps"
    assert any("language_model" in k for k in changed)
    AutoModelForImageTextToText.from_pretrained(out)  # loadable
    assert (out / "DONE").is_file()
    card = (out / "README.md").read_text()
    assert "grpo" in card and "faithfulness_reward (" in card and "truth" in card
    assert "| data splits | trained on `train`; nothing evaluated during training |" in card  # QA round 9, row 114
    assert json.loads((out / "ctiqa_training.json").read_text())["adapter"] is False
    # every reward is logged per step (trainer_state.json holds what TensorBoard shows)
    logged = next(h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h)
    for name in ("score_reward", "format_reward", "faithfulness_reward"):
        assert f"rewards/{name}/mean" in logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").iterdir()))).Reload()
    assert "train/rewards/faithfulness_reward/mean" in events.Tags()["scalars"]


def test_grpo_trains_an_sft_lora_adapter_further(sft_model, dataset_dir, tmp_path):
    """QA round 9: `--model_name_or_path SFT_ADAPTER` (the documented start after a LoRA/QLoRA SFT) ended in
    "folder has no config.json" before anything loaded. The adapter is trained further on its base and saved as an
    adapter of that base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    net = get_peft_model(AutoModelForImageTextToText.from_pretrained(sft_model, dtype=torch.float32),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    adapter = tmp_path / "sft-adapter"
    net.save_pretrained(adapter)
    AutoProcessor.from_pretrained(sft_model).save_pretrained(adapter)  # as recipes/sft.py saves it
    out = tmp_path / "rl"
    _run(_cmd("--model_name_or_path", str(adapter), "--dataset_name", str(dataset_dir), "--output_dir", str(out),
              "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
              "--max_completion_length", "32", "--save_strategy", "no", "--learning_rate", "1e-2",
              "--lora_r", "2"))
    # QA round 11: the card stated the recipe's LoRA settings (and a --lora_r that was not used), not the adapter's
    card = (out / "README.md").read_text()
    assert "| LoRA r / alpha / dropout | 4 / 8 / 0.0 |" in card, [x for x in card.splitlines() if "LoRA" in x]
    assert json.loads((out / "ctiqa_run.json").read_text())["lora_r"] == 4
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_model)
    assert (out / "DONE").is_file()


@pytest.mark.slow  # ~2.5 min on one busy core: an uninterrupted run, a killed one and its resumption
def test_resume_after_a_kill_restores_the_checkpoint_weights(sft_model, dataset_dir, tmp_path):
    """Killed with SIGKILL after its first checkpoint, then re-run: it resumes there and ends with exactly the
    weights of an uninterrupted run (CPU runs are deterministic for a seed). Without restoring the checkpoint's
    weights (transformers 5's non-strict reload matches no Gemma 3 key) every tensor differs."""
    args = ["--model_name_or_path", str(sft_model), "--dataset_name", str(dataset_dir), "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "32",
            "--save_steps", "1", "--save_total_limit", "5", "--learning_rate", "1e-3"]
    whole = tmp_path / "whole"
    _run(_cmd(*args, "--output_dir", str(whole)))

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(*args, "--output_dir", str(out)), cwd=REPO, env={**os.environ, **OFFLINE},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (out / "checkpoint-1" / "trainer_state.json").is_file():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for_lock_release(os.path.realpath(out))  # the training process gone, its output_dir lock freed
    ckpt = Path(grpo.last_complete_checkpoint(str(out)))
    assert not (out / "DONE").exists() and ckpt.name != "checkpoint-3", "killed too late"
    start, saved = _weights(sft_model), _weights(ckpt)
    assert any(not torch.equal(start[k], saved[k]) for k in start), "the checkpoint holds the starting weights"

    log = _run(_cmd(*args, "--output_dir", str(out)))
    assert f"resuming training at {ckpt}" in log.stdout + log.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    resumed, reference = _weights(out), _weights(whole)
    assert resumed.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not differ, f"resumed run ends with other weights than an uninterrupted one: {differ[:5]}"


def test_demo_rl_targets_say_which_are_met():
    from ctiqa.demo_rl import targets

    def res(fs, sev, srcc_p, srcc_t, mae):
        return {"explanation_check": {"false_streak_rate": fs, "severity_match_rate": sev},
                "metrics": {"probability": {"srcc": srcc_p, "mae": mae}, "parsed": {"srcc": srcc_t, "mae": mae}}}

    rows = targets(res(0.59, 0.67, 0.926, 0.865, 0.60), res(0.08, 0.80, 0.930, 0.850, 0.40))
    assert [(t.split(" ")[0], m) for t, _, _, m in rows] == [
        ("false-streak", True), ("severity", False), ("SRCC", True), ("SRCC", False), ("MAE", True), ("MAE", True)]
    assert rows[0][1:3] == ("0.590", "0.080")
    assert targets({}, res(0.0, 1.0, 1.0, 1.0, 0.0))[0][3] is None  # a missing figure is not "met"


@pytest.mark.slow  # ~1 min on one busy core with the SFT warm-up fixture
def test_gemma3_training_forward_gets_token_type_ids(sft_model, dataset_dir, tmp_path):
    """Gemma 3 attends bidirectionally within the image block only when the forward gets ``token_type_ids``;
    transformers does not refuse a training forward without them, so check that GRPOTrainer passes them."""
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    script_args, _, _ = grpo.parse_args(["--config", str(TINY_RECIPE)])
    train, _ = grpo.add_reference_findings(load_dataset(str(dataset_dir))["train"], "truth")
    model = AutoModelForImageTextToText.from_pretrained(sft_model)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((torch.is_grad_enabled() and m.training,
                                             kwargs.get("past_key_values") is not None,
                                             kwargs.get("token_type_ids") is not None)), with_kwargs=True)
    processor = AutoProcessor.from_pretrained(sft_model)
    processor.tokenizer.padding_side = "left"
    args = GRPOConfig(output_dir=str(tmp_path / "rl"), use_cpu=True, bf16=False, max_steps=1,
                      per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                      report_to="none", save_strategy="no")
    GRPOTrainer(model=model, reward_funcs=grpo.reward_functions(script_args), args=args, train_dataset=train,
                processing_class=processor).train()
    # the loss forwards (gradients on, no KV cache); generation's decode steps rightly go without them
    training_forwards = [has for grad, cached, has in seen if grad and not cached]
    assert training_forwards and all(training_forwards), seen
