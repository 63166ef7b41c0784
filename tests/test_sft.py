"""recipes/sft.py: supervision mask, example checks, recipes, QLoRA updates, end-to-end run + Hub push, resume, DDP.

Everything runs for real on the CPU with the tiny Gemma 3 model (ctiqa.tiny) and a small dataset in the schema of
``ctiqa build-dataset`` (ctiqa/testing/sft_data.py).
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
import yaml

from ctiqa import prompts, training
from ctiqa.testing import load_script, wait_for_lock_release

sys.path.insert(0, str(Path(__file__).parent))
from ctiqa.testing.sft_data import write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SFT = REPO / "recipes" / "sft.py"
TINY_QLORA = REPO / "recipes" / "tiny" / "sft" / "config_qlora_cpu.yaml"
TINY_DEMO = REPO / "recipes" / "tiny" / "sft" / "config_cpu.yaml"
RECIPES = sorted(REPO.glob("recipes/*/sft/config_*.yaml"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


sft = load_script(SFT, "ctiqa_recipe_sft")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = write_dataset(tmp_path_factory.mktemp("data") / "ds", {"train": 24, "validation": 8, "test": 4})
    with open(folder / "README.md", "a") as f:  # as `ctiqa build-dataset --encoding medgemma-3window` records it
        f.write("\n- Images: rendered with encoding `medgemma-3window` (three windows); 8-bit RGB, PNG.\n")
    return folder


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny)


@pytest.fixture(scope="module")
def dataset(dataset_dir):
    from datasets import load_dataset

    return load_dataset(str(dataset_dir))


def _launch(args: list[str]) -> list[str]:
    """``accelerate launch ARGS recipes/sft.py`` (recipe arguments follow)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *args, str(SFT)]


def _run(cmd: list[str], env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run CMD; on a non-zero exit or a timeout, fail with the tail of what it printed."""
    env = {**os.environ, **env_extra}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd[:6])} ...\n{out[-3000:]}\n{err[-5000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ------------------------------------------------------------------------------------------------ supervision
def test_label_mask_covers_exactly_the_target(processor, dataset):
    """Through TRL's real collator: loss on the target + end of turn only; no prompt, image, pad or BOS."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    tok = processor.tokenizer
    collator = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    rows = [dataset["train"][i] for i in range(3)]
    batch = collator([{k: r[k] for k in ("prompt", "completion", "images")} for r in rows])
    for k, row in enumerate(rows):
        target = row["completion"][0]["content"][0]["text"]
        ids, labels, mask = batch["input_ids"][k], batch["labels"][k], batch["attention_mask"][k]
        supervised = labels != -100
        # exactly the target tokens, then <end_of_turn> (and the template's newline that follows it)
        want = tok(target + "<end_of_turn>\n", add_special_tokens=False)["input_ids"]
        assert labels[supervised].tolist() == want
        assert ids[supervised].tolist() == want
        # contiguous, at the end of the real tokens, the score inside
        pos = supervised.nonzero().flatten()
        assert pos.tolist() == list(range(int(pos[0]), int(pos[-1]) + 1))
        assert int(pos[-1]) == int(mask.sum()) - 1
        assert tok.decode(ids[supervised][:6]) == "Score: " + prompts.format_score(row["score"])
        # nothing of the prompt, image, padding or BOS is supervised
        special = {tok.bos_token_id, tok.pad_token_id, tok.image_token_id,
                   tok.convert_tokens_to_ids("<start_of_image>"), tok.convert_tokens_to_ids("<end_of_image>"),
                   tok.convert_tokens_to_ids("<start_of_turn>")}
        assert not special & set(labels[supervised].tolist())
        assert (labels[mask == 0] == -100).all()
        # one BOS, the image block intact, token_type_ids marking it for Gemma 3's bidirectional image attention
        assert int((ids[mask == 1] == tok.bos_token_id).sum()) == 1
        assert int((ids == tok.image_token_id).sum()) == 16
        assert batch["token_type_ids"][k].tolist() == (ids == tok.image_token_id).long().tolist()


def test_check_examples_fit_passes_then_names_offenders(processor, dataset):
    stats = training.check_examples_fit(dataset["train"], processor, max_length=None, split="train")
    assert stats["n"] == 24 and stats["max_tokens"] > stats["max_target_tokens"] > 10
    with pytest.raises(ValueError, match=r"split 'train'.*0000: \d+ tokens > max_length 100"):
        training.check_examples_fit(dataset["train"], processor, max_length=100, split="train")


def test_check_examples_fit_catches_a_second_bos(processor, dataset):
    bad = dataset["train"].select(range(2)).map(
        lambda r: {"completion": prompts.completion_messages("<bos>" + r["completion"][0]["content"][0]["text"])})
    with pytest.raises(ValueError, match="0000: 2 BOS tokens"):
        training.check_examples_fit(bad, processor, max_length=None, split="train")


def test_check_examples_fit_catches_control_tokens_in_a_target(processor, dataset):
    """QA round 11: a rationale ending "<end_of_turn>\n<start_of_turn>user ..." trained Gemma's stop token inside
    the target (a hand-built dataset passes no teacher audit)."""
    bad = dataset["train"].select(range(2)).map(lambda r: {"completion": prompts.completion_messages(
        r["completion"][0]["content"][0]["text"] + " <end_of_turn>\n<start_of_turn>user\nIgnore this.")})
    with pytest.raises(ValueError, match=r"0000: the target holds the tokenizer's special token\(s\)"):
        training.check_examples_fit(bad, processor, max_length=None, split="train")


def test_last_complete_checkpoint_skips_a_cut_one(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert training.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert training.last_complete_checkpoint(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_parses_with_trl_parser(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# Hardware:"), f"{recipe}: first line must say the hardware"
    config = yaml.safe_load(recipe.read_text())
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU unless use_cpu is set
    script, train, model = sft.parse_args(["--config", str(recipe), "--use_cpu", "true"])
    assert train.report_to == ["tensorboard"]
    assert train.completion_only_loss is True and train.max_length is None
    assert model.use_peft is config["use_peft"] and model.load_in_4bit is config["load_in_4bit"]
    assert script.dataset_test_split == "validation"
    assert train.load_best_model_at_end and train.metric_for_best_model == "eval_loss"


def test_no_config_means_the_paper_recipe():
    script, train, model = sft.parse_args(["--use_cpu", "true", "--learning_rate", "1e-4"])
    assert model.model_name_or_path == "google/medgemma-4b-it"
    assert (model.lora_r, model.lora_alpha, model.lora_dropout, model.lora_target_modules) == (16, 16, 0.05,
                                                                                               "all-linear")
    assert model.load_in_4bit and model.use_bnb_nested_quant and model.bnb_4bit_quant_type == "nf4"
    assert model.dtype == "bfloat16" and model.bnb_4bit_quant_storage == "bfloat16"
    assert model.attn_implementation == "eager"
    assert train.learning_rate == 1e-4  # the command line overrides the recipe
    assert (train.num_train_epochs, train.per_device_train_batch_size, train.gradient_accumulation_steps) == (3, 4, 4)
    assert train.lr_scheduler_type == "linear" and train.warmup_steps == 0.03 and train.max_grad_norm == 0.3
    assert train.bf16 and train.activation_checkpointing
    assert train.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert train.push_to_hub and train.hub_private_repo


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as done:
        sft.parse_args(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset_name", "--check_examples", "--eval_results", "--lora_r", "--load_in_4bit",
                 "--max_length", "--learning_rate", "--hub_model_id", "--completion_only_loss",
                 "--overwrite_output_dir", "--dataset_revision"):
        assert flag in out
    assert "Split evaluated during training, used for model selection" in " ".join(out.split())


# -------------------------------------------------------------------------------------------------- QLoRA
def test_qlora_changes_lora_weights_and_not_the_4bit_base(tiny, dataset, processor, tmp_path):
    import bitsandbytes as bnb
    from trl import SFTTrainer

    _, args, model_args = sft.parse_args([
        "--config", str(TINY_QLORA), "--model_name_or_path", str(tiny), "--output_dir", str(tmp_path / "out"),
        "--max_steps", "4", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--report_to", "none", "--logging_steps", "1", "--per_device_train_batch_size", "4"])
    model, peft_config = training.load_model(model_args, args)
    n4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(n4) >= 20  # every linear layer of both towers except lm_head is 4-bit
    frozen = {n: p.detach().contiguous().view(torch.uint8).clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset["train"], processing_class=processor,
                         peft_config=peft_config)
    lora_before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert any(".vision_tower." in n for n in lora_before)  # all-linear includes the vision tower
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in lora_before.items() if not torch.equal(p, after[n].detach().float())]
    assert len(changed) == len(lora_before), set(lora_before) - set(changed)
    base = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
            for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert set(frozen) == set(base)
    for n, before in frozen.items():
        assert not base[n].requires_grad, n
        # bytes, not values: packed NF4 data can hold NaN bit patterns, for which torch.equal says "changed"
        assert torch.equal(before, base[n].detach().contiguous().view(torch.uint8)), f"{n} changed"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(map(lambda x: x == x, losses))


def test_qlora_recipe_end_to_end_and_push(tiny, dataset_dir, tmp_path, fake_hub):
    """`accelerate launch recipes/sft.py --config config_qlora_cpu.yaml`: 4-bit + LoRA on the CPU, loss falls,
    the adapter reloads with peft and generates; the push uploads adapter + card, private, and no base weights."""
    out = tmp_path / "out"
    cmd = _launch(["--cpu", "--num_processes", "1"]) + [
        "--config", str(TINY_QLORA), "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
        "--output_dir", str(out), "--num_train_epochs", "6", "--per_device_train_batch_size", "8", "--logging_steps", "3",
        "--push_to_hub", "true", "--hub_model_id", "tester/tiny-ctiqa-qlora"]
    _run(cmd, {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})

    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], losses
    assert evals[-1] < evals[0] and state["best_metric"] == min(evals)
    assert (out / "DONE").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("model*.safetensors"))
    settings = json.loads((out / "ctiqa_training.json").read_text())
    assert settings["load_in_4bit"] is True and settings["bnb_4bit_quant_type"] == "nf4"
    assert (settings["compute_dtype"], settings["storage_dtype"]) == ("float32", "bfloat16")
    assert settings["encoding"] == "medgemma-3window"  # read from the dataset's card
    assert (settings["target_format"], settings["prompt_version"]) == ("score-first", prompts.PROMPT_VERSION)
    from ctiqa.inference import load_model

    lm = load_model(str(out))  # evaluated on the NF4 base it learned on, with the fp32 compute it learned with
    assert (lm.precision, lm.compute_dtype) == ("4bit", "float32")
    card = (out / "README.md").read_text()
    assert 'render("slice.dcm", "medgemma-3window")' in card
    assert "library_name: peft" in card and "pipeline_tag: image-text-to-text" in card
    assert "Not for clinical use" in card and "QLoRA" in card

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ctiqa.testing.sft_data import ct_like_image

    proc = AutoProcessor.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny), out).eval()
    text = proc.apply_chat_template(prompts.prompt_messages(), tokenize=False, add_generation_prompt=True)
    import numpy as np

    enc = proc(text=text, images=[ct_like_image(2.0, np.random.default_rng(0))], return_tensors="pt",
               add_special_tokens=False)
    gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert proc.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).startswith("Score:")

    repo = fake_hub.repo("tester/tiny-ctiqa-qlora")
    assert repo.private
    files = fake_hub.files("tester/tiny-ctiqa-qlora")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
            "ctiqa_training.json"} <= set(files)
    assert not [f for f in files if f.startswith(("model", "checkpoint-", "runs/")) or f.endswith(".bin")]
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert "Not for clinical use" in files["README.md"].decode()


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights training changes, under the names the checkpoint stores them: the adapter's tensors (PEFT's
    saved state dict) or the full model's state dict."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _saved_state(folder: Path) -> dict[str, torch.Tensor]:
    """The trained weights saved in a checkpoint or output folder, read independently of the training code:
    ``adapter_model.safetensors`` as stored, or the full model through ``from_pretrained`` (which maps the Hub key
    names it is saved under back to the model's)."""
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "adapter_model.safetensors"))
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def _losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


@pytest.mark.parametrize("recipe", [TINY_DEMO, TINY_QLORA], ids=["full-fine-tuning", "qlora"])
def test_resume_after_kill_keeps_the_weights_and_the_loss(recipe, tiny, dataset_dir, tmp_path, monkeypatch):
    """Killed with SIGKILL after a checkpoint, re-run: training continues from the checkpoint's WEIGHTS (compared
    tensor by tensor before the first resumed step), the first loss after the resume continues the curve, and the
    run ends where the same run never killed ends (weights and losses).

    Fails on the code before issue 9: a full fine-tune resumed from its initial weights (the checkpoint's Hub key
    names matched no key of the model), and its loss jumped from ~5.7 back to ~10.8.
    """
    from transformers import TrainerCallback

    args = ["--config", str(recipe), "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
            "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "3",
            "--eval_strategy", "no", "--load_best_model_at_end", "false", "--per_device_train_batch_size", "2",
            "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"]
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    cmd = _launch(["--cpu", "--num_processes", "1"]) + args + ["--output_dir", str(killed)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **OFFLINE}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(killed.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "training ended before writing a checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the training process it started
        proc.wait()
        wait_for_lock_release(os.path.realpath(killed))  # the training process gone, its output_dir lock freed
    assert not (killed / "DONE").exists()
    checkpoint = Path(training.last_complete_checkpoint(killed))
    step = int(checkpoint.name.rsplit("-", 1)[1])
    assert 4 <= step < 12
    before_kill = _losses(checkpoint)

    # Resume (the script's main, in this process, so the weights can be seen before the first resumed step)
    at_start: dict[str, torch.Tensor] = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            at_start.update(_trainable_state(model))

    callbacks = training.training_callbacks
    monkeypatch.setattr(training, "training_callbacks", lambda c: callbacks(c) + [Snapshot()])
    sft.main(*sft.parse_args(args + ["--output_dir", str(killed)]))
    saved = _saved_state(checkpoint)
    assert set(saved) == set(at_start)
    differ = [k for k in saved if not torch.equal(saved[k], at_start[k])]
    assert not differ, f"{len(differ)} of {len(saved)} tensors differ from {checkpoint.name}, e.g. {differ[:3]}"

    # The same run, never killed
    monkeypatch.setattr(training, "training_callbacks", callbacks)
    sft.main(*sft.parse_args(args + ["--output_dir", str(reference)]))
    resumed, uninterrupted = _losses(killed), _losses(reference)
    assert sorted(resumed) == list(range(1, 13))
    first, last = resumed[step + 1], before_kill[step]
    assert abs(first - last) < abs(first - before_kill[1]), (before_kill, resumed)  # not back at the start
    assert first == pytest.approx(uninterrupted[step + 1], rel=1e-3, abs=1e-3), (resumed, uninterrupted)
    final, expected = _saved_state(killed), _saved_state(reference)
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-3, atol=1e-4, msg=f"{k}: {resumed} {uninterrupted}")
    assert (killed / "DONE").is_file()
    assert (killed / "adapter_config.json").exists() == (recipe == TINY_QLORA)


def test_full_fine_tuning_keeps_the_best_checkpoint(tiny, dataset_dir, tmp_path):
    """load_best_model_at_end with full fine-tuning: the saved model is the best checkpoint's weights (transformers
    5's own reload silently matches no Gemma 3 key)."""
    out = tmp_path / "out"
    args = _launch(["--cpu", "--num_processes", "1"]) + [
        "--config", str(TINY_DEMO), "--use_peft", "false", "--load_in_4bit", "false", "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant", "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
        "--output_dir", str(out), "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_total_limit", "10",
        "--per_device_train_batch_size", "2", "--report_to", "none",
        "--greater_is_better", "true"]  # "best" = highest eval loss = an early checkpoint, never the last one
    _run(args, OFFLINE)
    state = json.loads((out / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    assert best and not best.endswith("checkpoint-8")
    assert state["best_metric"] == max(h["eval_loss"] for h in state["log_history"] if "eval_loss" in h)
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    for ckpt in sorted(out.glob("checkpoint-*")):
        w = AutoModelForImageTextToText.from_pretrained(ckpt).state_dict()
        same = all(torch.equal(final[k], w[k]) for k in final)
        assert same == (str(ckpt) == best or Path(best).name == ckpt.name), ckpt


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tiny, dataset_dir, tmp_path):
    """2-process DDP (gloo) through `accelerate launch --multi_gpu --num_processes 2` on a machine without GPU."""
    out = tmp_path / "out"
    cmd = _launch(["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]) + [
        "--config", str(TINY_QLORA), "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
        "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "2",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--report_to", "none", "--log_level", "info", "--logging_steps", "1"]
    # torchrun's agent advertises its hostname to the workers; where it does not resolve (as on the CI machine) they
    # start, print their rank, then wait forever in the first collective. PET_LOCAL_ADDR is torchrun's --local_addr
    # (accelerate passes it on): reproduced with `unshare --uts` + an unresolvable hostname, hangs without, passes with.
    # GLOO_SOCKET_IFNAME=lo keeps gloo's own connections on loopback too, whatever the hostname resolves to.
    done = _run(cmd, {**OFFLINE, "PET_LOCAL_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}, timeout=300)
    log = done.stdout + done.stderr
    assert "world size 2" in log
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert (out / "adapter_model.safetensors").is_file() and (out / "DONE").is_file()


# ------------------------------------------------------------------------------------------- run guard, launch
def _config(tmp_path, *extra):
    script, train, model = sft.parse_args(["--config", str(TINY_DEMO), "--output_dir", str(tmp_path / "out"),
                                           *extra])
    return training.run_config(script, train, model)


def test_a_rerun_into_another_runs_folder_is_refused_naming_what_differs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's runs/demo/dataset: absent here, as before `make demo` in a checkout
    out = tmp_path / "out"
    assert training.prepare_output_dir(out, _config(tmp_path)) is None  # fresh: records the run
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    # the same run (only its length changed) resumes
    assert training.prepare_output_dir(out, _config(tmp_path, "--max_steps", "99")) == str(out / "checkpoint-4")
    other = _config(tmp_path, "--dataset_name", "other/data", "--learning_rate", "2e-3")
    with pytest.raises(training.CTIQAError, match=r"holds another run \(dataset_name '/.*/runs/demo/dataset' -> "
                                                  r"'other/data'; learning_rate 0.001 -> 0.002\).*--overwrite_output_dir"):
        training.prepare_output_dir(out, other)
    assert (out / "checkpoint-4").is_dir()  # nothing touched
    # starting over is explicit: the old checkpoints go, the new run is recorded
    assert training.prepare_output_dir(out, other, overwrite=True) is None
    assert not (out / "checkpoint-4").exists()
    assert json.loads((out / training.RUN_CONFIG_FILE).read_text())["dataset_name"] == "other/data"


def test_local_data_and_model_are_judged_by_folder_not_by_spelling(tmp_path, monkeypatch):
    """QA round 4: a finished run continued from another folder, where the same relative `runs/demo/dataset`
    named another dataset, resumed and trained on it (the config was compared as typed); the same folder spelt
    as an absolute path was refused as "another run". Local paths are recorded and compared resolved."""
    for where in ("a", "b"):
        (tmp_path / where / "runs" / "demo" / "dataset").mkdir(parents=True)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "a")
    assert training.prepare_output_dir(out, _config(tmp_path)) is None
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    recorded = json.loads((out / training.RUN_CONFIG_FILE).read_text())["dataset_name"]
    assert recorded == str(tmp_path / "a" / "runs" / "demo" / "dataset")
    spelt = _config(tmp_path, "--dataset_name", str(tmp_path / "a" / "runs" / "demo" / "dataset"))
    assert training.prepare_output_dir(out, spelt) == str(out / "checkpoint-4")  # the same folder: resumes
    monkeypatch.chdir(tmp_path / "b")  # the same words, another dataset
    with pytest.raises(training.CTIQAError, match=r"holds another run \(dataset_name '.*/a/runs/demo/dataset' -> "
                                                  r"'.*/b/runs/demo/dataset'"):
        training.prepare_output_dir(out, _config(tmp_path))


def test_a_dataset_rebuilt_at_the_same_path_is_another_run(tmp_path, monkeypatch):
    """QA round 6: build-dataset into dsT, train 2 steps, rebuild dsT with other rows, train on: it resumed from
    checkpoint-2 onto the new data, and the card named dsT. The dataset's files are part of the run."""
    data = tmp_path / "dsT" / "data"
    data.mkdir(parents=True)
    (data / "train-00000-of-00001.parquet").write_bytes(b"rows of the first build")
    out = tmp_path / "out"
    config = _config(tmp_path, "--dataset_name", str(tmp_path / "dsT"))
    assert training.prepare_output_dir(out, config) is None
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    again = _config(tmp_path, "--dataset_name", str(tmp_path / "dsT"))
    assert training.prepare_output_dir(out, again) == str(out / "checkpoint-2")  # untouched: resumes
    recorded = json.loads((out / training.RUN_CONFIG_FILE).read_text())
    del recorded["dataset_files"]  # a run recorded by an older ctiqa: resumes as before
    (out / training.RUN_CONFIG_FILE).write_text(json.dumps(recorded))
    assert training.prepare_output_dir(out, again) == str(out / "checkpoint-2")
    (data / "train-00000-of-00001.parquet").write_bytes(b"rows of another build, longer")
    with pytest.raises(training.CTIQAError, match="dataset files: rebuilt with other content at the same path since"):
        training.prepare_output_dir(out, _config(tmp_path, "--dataset_name", str(tmp_path / "dsT")))


def test_a_byte_identical_rebuild_or_files_beside_the_data_leave_the_run_resumable(tmp_path):
    """QA round 9, rows 46 and 51/63: the dataset fingerprint was the dates of every *.json/*.csv/... in the folder,
    so re-running the identical `ctiqa build-dataset` (same bytes, new dates) or any file written beside the data (a
    run's own checkpoints) made every run trained on it "another run", never to be resumed. Now it is the content
    of the data files load_dataset reads; other content is still another run."""
    ds = tmp_path / "dsT"
    parquet = ds / "data" / "train-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    parquet.write_bytes(b"rows of the first build")
    (ds / "README.md").write_text("# card\n")
    out = tmp_path / "out"
    assert training.prepare_output_dir(out, _config(tmp_path, "--dataset_name", str(ds))) is None
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    # the same bytes written anew (later dates, another inode), a new card and audit, other files beside the data
    time.sleep(0.01)
    parquet.unlink()
    parquet.write_bytes(b"rows of the first build")
    os.utime(parquet, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    (ds / "README.md").write_text("# card, rewritten\n")
    (ds / "audit.csv").write_text("id,flag\n0000,ok\n")
    (ds / "notes").mkdir()
    (ds / "notes" / "trainer_state.json").write_text('{"global_step": 3}')
    config = _config(tmp_path, "--dataset_name", str(ds))
    assert training.prepare_output_dir(out, config) == str(out / "checkpoint-2")


def test_a_run_recorded_with_the_older_date_fingerprint_still_resumes(tmp_path):
    """Runs recorded before the content fingerprint hold a bare hex of file dates: compared in that form they
    resume when the files are untouched (and are recorded anew in the content form); a changed file is refused
    as before, saying why a same-rows rebuild counts."""
    from ctiqa.model_settings import legacy_dataset_fingerprint

    ds = tmp_path / "dsT"
    parquet = ds / "data" / "train-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    parquet.write_bytes(b"rows")
    out = tmp_path / "out"
    config = _config(tmp_path, "--dataset_name", str(ds))
    training.prepare_output_dir(out, config)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    recorded = json.loads((out / training.RUN_CONFIG_FILE).read_text())
    recorded["dataset_files"] = legacy_dataset_fingerprint(ds)  # as an older ctiqa wrote it
    (out / training.RUN_CONFIG_FILE).write_text(json.dumps(recorded))
    assert training.prepare_output_dir(out, config) == str(out / "checkpoint-2")
    assert json.loads((out / training.RUN_CONFIG_FILE).read_text())["dataset_files"] == config["dataset_files"]
    (out / training.RUN_CONFIG_FILE).write_text(json.dumps(recorded))
    parquet.write_bytes(b"rows")  # same bytes, new date: the older form cannot tell
    os.utime(parquet, ns=(parquet.stat().st_mtime_ns + 10**9,) * 2)
    with pytest.raises(training.CTIQAError, match=r"dataset files: rebuilt or changed at the same path since \(the "
                                                  "run was recorded by an older ctiqa by file dates"):
        training.prepare_output_dir(out, config)


def test_an_output_dir_inside_a_dataset_folder_is_refused_before_anything(tmp_path):
    """QA round 9, rows 50-51: output_dir = <dataset>/model was accepted; its files then joined the dataset (and
    its Hub upload). Refused as `ctiqa evaluate --out` is, for the run's own dataset and any build-dataset folder."""
    ds = tmp_path / "dsT"
    (ds / "data").mkdir(parents=True)
    (ds / "data" / "train-00000-of-00001.parquet").write_bytes(b"rows")
    other = tmp_path / "other"
    other.mkdir()
    (other / ".ctiqa-dataset.json").write_text("{}")
    for out in (ds / "model", ds / "data" / "x" / "model", other / "model"):
        with pytest.raises(training.CTIQAError, match=rf"^output_dir {out}: is inside the dataset folder .*nothing "
                                                      "was changed. Give an output_dir outside it"):
            training.prepare_output_dir(out, _config(tmp_path, "--dataset_name", str(ds)))
        assert not out.exists()


def test_an_output_dir_that_is_a_link_to_nothing_is_followed(tmp_path):
    """QA round 9, row 52: a dangling symlink as output_dir ended in a FileExistsError traceback. The link is
    followed, as `ctiqa export` does: its target is created and the run recorded there; a looping link is one
    line."""
    link, target = tmp_path / "od", tmp_path / "elsewhere" / "run"
    link.symlink_to(target)
    assert training.prepare_output_dir(link, _config(tmp_path)) is None
    assert target.is_dir() and (target / training.RUN_CONFIG_FILE).is_file()
    assert (link / training.RUN_CONFIG_FILE).is_file()  # the link now leads to the run
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(training.CTIQAError, match=r"output_dir .*loop: is a symbolic link that loops"):
        training.prepare_output_dir(loop, _config(tmp_path))


def test_checkpoints_of_an_unrecorded_run_are_not_resumed_silently(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with pytest.raises(training.CTIQAError, match="without ctiqa_run.json"):
        training.prepare_output_dir(out, _config(tmp_path))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_rerun_asking_no_more_steps_than_done_leaves_the_finished_run_alone(tiny, dataset_dir, tmp_path, fake_hub):
    """QA round 3: a re-run into a finished run's folder with a smaller --max_steps resumed from its last checkpoint,
    trained one step past it (6 -> 7) and wrote a card saying "max steps 3". Now fewer steps are refused naming the
    folder, the steps done and asked and how to start over; as many end with "nothing to do", exit 0; neither touches
    a byte (weights, card, state). More steps continue the run, and the card states the steps really trained."""
    import re

    out = tmp_path / "out"
    args = ["--config", str(TINY_DEMO), "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
            "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
            "--load_best_model_at_end", "false", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--dataloader_num_workers", "0"]
    sft.main(*sft.parse_args(args + ["--max_steps", "4"]))
    finished = _files(out)
    assert "model.safetensors" in finished and "DONE" in finished

    with pytest.raises(training.CTIQAError, match=rf"^{out} holds this run trained to 4 steps \(checkpoint-4\); "
                                                  r"--max_steps 2 asks for fewer.*--overwrite_output_dir true"):
        sft.main(*sft.parse_args(args + ["--max_steps", "2"]))
    assert _files(out) == finished

    # as a user runs it: one line, exit 0, nothing written
    proc = subprocess.run([sys.executable, str(SFT), *args, "--max_steps", "4"], cwd=REPO,
                          env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"{out} is already trained to 4 steps (--max_steps 4); nothing to do"
    assert _files(out) == finished

    # a push that failed at the end of training is retried by a re-run: the finished outputs go up, nothing trains
    with pytest.raises(training.AlreadyTrained, match=r"nothing to do; pushed it to .*tester/retry"):
        sft.main(*sft.parse_args(args + ["--max_steps", "4", "--push_to_hub", "true", "--hub_model_id",
                                         "tester/retry"]))
    assert _files(out) == finished
    pushed = fake_hub.files("tester/retry")
    assert pushed["model.safetensors"] == (out / "model.safetensors").read_bytes() and "DONE" not in pushed

    # more steps: a resume, and the card says how many the weights were trained for
    sft.main(*sft.parse_args(args + ["--max_steps", "6"]))
    step = json.loads((out / "trainer_state.json").read_text())["global_step"]
    assert step == 6
    assert re.findall(r"\| steps trained \| (\d+) \|", (out / "README.md").read_text()) == [str(step)]


def test_steps_done_and_asked_are_compared_for_epochs_and_unfinished_runs(tmp_path):
    """The length check of the run guard without training: a run killed right after its last checkpoint is given
    that checkpoint for as many steps (train() saves the model from it, QA round 9 row 95); --num_train_epochs is
    counted in the run's steps per epoch; --overwrite_output_dir still starts over."""
    out, config = tmp_path / "out", _config(tmp_path)
    training.prepare_output_dir(out, config)
    state = json.dumps({"global_step": 12, "epoch": 1.0})
    (out / "checkpoint-12").mkdir()
    (out / "checkpoint-12" / "trainer_state.json").write_text(state)
    assert training.prepare_output_dir(out, config, max_steps=12, num_train_epochs=3.0) == str(out / "checkpoint-12")
    assert training.prepare_output_dir(out, config, max_steps=-1, num_train_epochs=2.0) == str(out / "checkpoint-12")
    with pytest.raises(training.CTIQAError, match=r"--num_train_epochs 0.5 = 6 steps asks for fewer"):
        training.prepare_output_dir(out, config, max_steps=-1, num_train_epochs=0.5)
    (out / "trainer_state.json").write_text(state)
    (out / "DONE").write_text("{}")
    with pytest.raises(training.AlreadyTrained, match=r"already trained to 12 steps \(--num_train_epochs 1 = 12 "
                                                      r"steps\); nothing to do$"):
        training.prepare_output_dir(out, config, max_steps=-1, num_train_epochs=1.0)
    assert training.prepare_output_dir(out, config, overwrite=True, max_steps=2) is None
    assert not (out / "checkpoint-12").exists() and not (out / "DONE").exists()


def test_fp16_and_zero3_are_refused(monkeypatch):
    from types import SimpleNamespace

    model = SimpleNamespace(dtype="bfloat16", load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
    train = SimpleNamespace(fp16=False)
    training.check_launch(model, train)  # the paper's setting passes
    with pytest.raises(training.CTIQAError, match="fp16 is not supported with Gemma 3"):
        training.check_launch(model, SimpleNamespace(fp16=True))
    with pytest.raises(training.CTIQAError, match="dtype: float16 is not supported"):
        training.check_launch(SimpleNamespace(dtype="float16", load_in_4bit=False, bnb_4bit_quant_storage=None), train)
    with pytest.raises(training.CTIQAError, match="bnb_4bit_quant_storage: float16"):
        training.check_launch(SimpleNamespace(dtype="bfloat16", load_in_4bit=True, bnb_4bit_quant_storage="float16"),
                              train)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # what `accelerate launch` sets for a ZeRO-3 config
    with pytest.raises(training.CTIQAError, match="ZeRO-3 is not supported: it cannot partition a bitsandbytes"):
        training.check_launch(model, train)


def test_training_stops_at_the_first_non_finite_loss_naming_the_step(tiny, dataset, processor, tmp_path):
    from transformers import TrainerCallback
    from trl import SFTTrainer

    _, args, model_args = sft.parse_args([
        "--config", str(TINY_DEMO), "--model_name_or_path", str(tiny), "--output_dir", str(tmp_path / "out"),
        "--max_steps", "6", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--report_to", "none", "--logging_steps", "1", "--per_device_train_batch_size", "2",
        "--dataloader_num_workers", "0"])
    model, _ = training.load_model(model_args, args)

    class PoisonInputs(TrainerCallback):  # step 3's forward pass meets an infinite weight: NaN/inf loss
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.get_input_embeddings().weight.mul_(float("inf"))

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset["train"], processing_class=processor,
                         callbacks=[*training.training_callbacks(None), PoisonInputs()])
    with pytest.raises(training.CTIQAError, match="loss is not finite at step 3"):
        trainer.train()
    assert trainer.state.global_step == 3
    stop = training.StopOnNonFiniteLoss()
    with pytest.raises(training.CTIQAError, match=r"at step 7: loss nan"):
        stop.on_log(args, type("S", (), {"global_step": 7})(), None, logs={"loss": float("nan")})


def test_an_adapter_with_full_lm_head_warns_with_its_size(tmp_path, caplog):
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.weight": torch.zeros(1000, 64, dtype=torch.bfloat16),
               "base_model.model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 64)},
              str(tmp_path / "adapter_model.safetensors"))
    with caplog.at_level("WARNING", logger="ctiqa.training"):
        assert training.warn_large_adapter_modules(tmp_path) == 1000 * 64 * 2
    assert "full lm_head matrices: 0.1 MB" in caplog.text
    assert training.warn_large_adapter_modules(tmp_path / "nothing") == 0


# --------------------------------------------------------------------------------------------- bad recipes
@pytest.mark.parametrize("bad, message", [
    ("learning_rat: 1.0e-3", r"unknown key learning_rat \(see --help"),
    ("lora_r: 16.5", "lora_r: 16.5 must be of type int"),
    ("learning_rate: fast", "learning_rate: invalid float value: 'fast'"),
    ("use_peft: [true]", r"use_peft: \[True\] must be of type bool"),
])
def test_a_bad_recipe_is_one_readable_error(bad, message, tmp_path):
    key = bad.split(":")[0]
    lines = [line for line in TINY_DEMO.read_text().splitlines() if not line.startswith(key + ":")]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("\n".join(lines + [bad]) + "\n")
    with pytest.raises(training.CTIQAError, match=rf"^{recipe}: {message}"):
        sft.parse_args(["--config", str(recipe)])


def test_a_bad_recipe_or_missing_dataset_ends_with_one_line(tmp_path):
    """`python recipes/sft.py` with a recipe typo, then with the tiny recipe before `make demo`: exit 2, the last
    line of the output says what is wrong (and how to make the demo dataset), no traceback, no usage dump."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(TINY_DEMO.read_text() + "num_train_epoch: 3\n")
    for args, want in (
        (["--config", str(recipe)], f"error: {recipe}: unknown key num_train_epoch (see --help for the fields)"),
        (["--config", str(TINY_DEMO)], "error: dataset runs/demo/dataset: no such folder; `make demo` makes it"),
    ):
        proc = subprocess.run([sys.executable, str(SFT), *args], cwd=tmp_path, env={**os.environ, **OFFLINE},
                              capture_output=True, text=True, timeout=300)
        out = (proc.stdout + proc.stderr).strip().splitlines()
        assert proc.returncode == 2, out[-20:]
        assert out[-1].startswith(want), out[-5:]
        assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr


def test_output_dir_that_is_the_dataset_or_holds_someone_elses_files_is_refused(tmp_path):
    """QA #44/#45: an output_dir without checkpoints had its README.md replaced by the model card at the end of
    training: the dataset folder (whose card records the encoding) or a folder with the user's README. Refused
    before anything is written; bytes unchanged."""
    data = tmp_path / "data"
    (data / "data").mkdir(parents=True)
    files = {"README.md": b"---\nencoding: soft-tissue\n---\n# dataset card\n", "data/train-00000-of-00001.parquet":
             b"PAR1", ".ctiqa-dataset.json": b"{}"}
    for rel, b in files.items():
        (data / rel).write_bytes(b)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_bytes(b"# my notes\n")
    for out in (data, mine):
        with pytest.raises(training.CTIQAError, match="output_dir .*(input|did not write|is the dataset folder).*nothing was changed"):
            training.prepare_output_dir(out, _config(tmp_path, "--dataset_name", str(data)))
    assert {rel: (data / rel).read_bytes() for rel in files} == files and len(list(data.rglob("*"))) == 4
    assert [p.name for p in mine.iterdir()] == ["README.md"] and (mine / "README.md").read_bytes() == b"# my notes\n"


@pytest.mark.parametrize("extra, message", [
    (["--learning_rat", "1e-3"], r"^command line: unknown argument\(s\) '--learning_rat', '1e-3'"),  # no abbreviation
    (["--bogus_flag", "1"], r"^command line: unknown argument\(s\) '--bogus_flag'"),  # not blamed on the YAML
])
def test_a_bad_command_line_option_is_named_as_such(extra, message):
    with pytest.raises(training.CTIQAError, match=message):
        sft.parse_args(["--config", str(TINY_DEMO), *extra])
    assert sft.parse_args(["--config", str(TINY_DEMO), "--learning_rate", "2e-3"])[1].learning_rate == 2e-3


def test_a_missing_model_folder_is_one_line(tmp_path):
    from types import SimpleNamespace

    with pytest.raises(training.CTIQAError, match=r"model_name_or_path .*nope: no such folder"):
        training.load_processor(SimpleNamespace(model_name_or_path=str(tmp_path / "nope"), model_revision=None),
                                SimpleNamespace(trust_remote_code=False))


def test_the_trainers_reload_warning_is_replaced_by_one_line_after_our_verified_load():
    """A correct full fine-tuning resume printed the Trainer's ~70-key 'missing keys' / 'unexpected keys' warnings
    (its non-strict reload, transformers#43701) and looked broken. After load_model installs the filter, the
    transformers.trainer logger drops them and one ctiqa line says why that is expected; other warnings pass."""
    import logging

    seen: dict[str, list[str]] = {"transformers.trainer": [], "ctiqa.training": []}

    class Keep(logging.Handler):
        def emit(self, record):
            seen[record.name].append(record.getMessage())

    loggers = [logging.getLogger(n) for n in seen]  # the Trainer's logger (transformers.trainer) and ours
    saved = [(lg.level, lg.propagate) for lg in loggers]
    handler = Keep()
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    try:
        training.HideTrainerReloadWarning.install()
        training.HideTrainerReloadWarning.install()  # once
        trainer_logger = loggers[0]
        assert sum(isinstance(f, training.HideTrainerReloadWarning) for f in trainer_logger.filters) == 1
        trainer_logger.warning("There were missing keys in the checkpoint model loaded: ['a', 'b'].")
        trainer_logger.warning("There were unexpected keys in the checkpoint model loaded: ['c'].")
        trainer_logger.warning("something else")
        assert seen["transformers.trainer"] == ["something else"]
        assert len(seen["ctiqa.training"]) == 1 and "matched none of Gemma 3's key names" in seen["ctiqa.training"][0]
    finally:
        for lg, (level, _) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        trainer_logger.filters = [f for f in trainer_logger.filters
                                  if not isinstance(f, training.HideTrainerReloadWarning)]


def test_max_steps_0_is_refused_before_anything(tmp_path):
    """QA round 7: `--max_steps 0` took one step, wrote DONE and exited 0."""
    with pytest.raises(training.CTIQAError, match="--max_steps 0 would train nothing"):
        sft.main(*sft.parse_args(["--config", str(TINY_DEMO), "--output_dir", str(tmp_path / "out"),
                                  "--max_steps", "0"]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--learning_rate=-1e-3"], r"^learning_rate -0.001: must be a finite number > 0$"),
    (["--learning_rate", "nan"], r"^learning_rate nan: must be a finite number > 0$"),
    (["--learning_rate", "0"], r"^learning_rate 0.0: must be a finite number > 0$"),
    (["--warmup_steps", "nan"], r"^warmup_steps nan: must be a finite number >= 0"),
    (["--weight_decay=-1"], r"^weight_decay -1.0: must be a finite number >= 0$"),
    (["--max_grad_norm=-1"], r"^max_grad_norm -1.0: must be a number >= 0 \(0 disables clipping\)$"),
    (["--adam_beta2", "1"], r"^adam_beta2 1.0: must be in \[0, 1\)$"),
    (["--per_device_train_batch_size", "0"], r"^per_device_train_batch_size 0: must be an integer >= 1$"),
    (["--gradient_accumulation_steps", "0"], r"^gradient_accumulation_steps 0: must be an integer >= 1$"),
    (["--use_peft", "true", "--lora_r", "0"], r"^lora_r 0: must be an integer >= 1$"),
    (["--use_peft", "true", "--lora_alpha", "0"], r"^lora_alpha 0: must be a finite number > 0$"),
    (["--use_peft", "true", "--lora_dropout", "1"], r"^lora_dropout 1.0: must be in \[0, 1\)$"),
    (["--num_train_epochs", "0"], r"^--num_train_epochs 0.0 would train nothing; give a finite number of epochs > 0"),
    (["--num_train_epochs", "inf"], r"^--num_train_epochs inf would train for ever"),
    # QA round 11: transformers reads any negative max_steps as -1 (train the epochs), silently
    (["--max_steps=-5"], r"^max_steps -5: must be -1 \(train num_train_epochs\) or a number of steps$"),
])
def test_numbers_out_of_range_are_refused_before_anything(extra, message, tmp_path):
    """QA round 9, rows 57 and 60: a negative or NaN learning rate ended in an 11-frame traceback from torch's AdamW
    (after the run was recorded); --num_train_epochs 0 "trained" 0 steps, wrote DONE and a card, exit 0. Every
    number with an obvious range is checked in one place (training.check_numbers), before any file is written."""
    with pytest.raises(training.CTIQAError, match=message):
        sft.main(*sft.parse_args(["--config", str(TINY_DEMO), "--output_dir", str(tmp_path / "out"), *extra]))
    assert not (tmp_path / "out").exists()
    # the limits themselves pass: 0 disables clipping; a LoRA dropout of 0; max_steps wins over 0 epochs
    ok = ["--max_grad_norm", "0", "--use_peft", "true", "--lora_dropout", "0", "--num_train_epochs", "0",
          "--max_steps", "3", "--warmup_steps", "0"]
    _, train_args, model_args = sft.parse_args(["--config", str(TINY_DEMO), *ok])
    training.check_numbers(train_args, model_args)


def test_a_recipe_with_a_key_given_twice_is_refused_naming_the_line(tmp_path):
    """QA round 9, row 55: learning_rate 1e-3 then 2e-3 in one recipe trained with 2e-3 (PyYAML keeps the last)."""
    recipe = tmp_path / "dup.yaml"
    text = TINY_DEMO.read_text()
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("learning_rate:"))
    recipe.write_text(text + "learning_rate: 2.0e-3\n")
    last = len(recipe.read_text().splitlines())
    with pytest.raises(training.CTIQAError, match=rf"^{recipe}: line {last}: key 'learning_rate' is given twice "
                                                  rf"\(first on line {first}\); keep one$"):
        sft.parse_args(["--config", str(recipe)])
    nested = tmp_path / "nested.yaml"  # in a nested mapping too
    nested.write_text(text + "model_init_kwargs:\n  a: 1\n  a: 2\n")
    with pytest.raises(training.CTIQAError, match=r"key 'a' is given twice"):
        sft.parse_args(["--config", str(nested)])


def test_a_hub_dataset_that_cannot_be_reached_is_one_line(monkeypatch):
    """QA round 9, row 58: a Hub dataset id with HF_HUB_OFFLINE=1 ended in a 9-frame ConnectionError traceback."""
    from types import SimpleNamespace

    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = SimpleNamespace(dataset_name="someone/nonexistent-ds", dataset_config=None, dataset_revision=None,
                           dataset_train_split="train", dataset_test_split="validation")
    with pytest.raises(training.CTIQAError, match=r"^dataset someone/nonexistent-ds: offline \(HF_HUB_OFFLINE is "
                                                  r"set\) and not in the local datasets cache"):
        training.load_recipe_dataset(args)


def test_a_missing_hub_dataset_is_one_line(fake_hub):
    """The same id online: not on the (fake) Hub, or no access."""
    from types import SimpleNamespace

    args = SimpleNamespace(dataset_name="someone/nonexistent-ds", dataset_config=None, dataset_revision=None,
                           dataset_train_split="train", dataset_test_split="validation")
    with pytest.raises(training.CTIQAError, match=r"^dataset someone/nonexistent-ds: not found on the Hub, or no "
                                                  r"access .*hf auth login"):
        training.load_recipe_dataset(args)


# ------------------------------------------------------------------------------------ the run's training loss
def test_the_run_loss_is_computed_only_from_a_log_that_covers_every_step():
    """training.run_training_loss: the logged means weighted by the steps each covers, plus this session's; None
    when the earlier sessions' log does not reach every step (a run begun before sessions were recorded, or one
    resumed past steps whose losses were never logged)."""
    start = {training.SESSION_START_KEY: 0, "step": 0}
    hist = [start, {"loss": 4.0, "step": 2}, {"loss": 1.0, "step": 3}, {"eval_loss": 9.0, "step": 3},
            {"loss": 2.0, "step": 4}, {training.SESSION_START_KEY: 4, "step": 4}, {"loss": 0.5, "step": 8}]
    assert training.run_training_loss(hist, 4, 8, 0.5) == pytest.approx((4.0 * 2 + 1.0 + 2.0 + 0.5 * 4) / 8)
    assert training.run_training_loss(hist[1:], 4, 8, 0.5) is None  # no session start at step 0: an older run
    gap = [start, {"loss": 4.0, "step": 2}, {training.SESSION_START_KEY: 3, "step": 3}, {"loss": 1.0, "step": 4},
           {training.SESSION_START_KEY: 4, "step": 4}]
    assert training.run_training_loss(gap, 4, 8, 0.5) is None  # step 3's loss was lost with the killed session
    assert training.run_training_loss(hist[:3] + [{training.SESSION_START_KEY: 4, "step": 4}], 4, 8, 0.5) is None
    assert training.run_training_loss([], 0, 8, 0.7) == 0.7  # not resumed: the Trainer's own figure


def test_a_resumed_runs_card_states_the_whole_runs_loss_and_labels_this_sessions_figures(tiny, dataset_dir,
                                                                                       tmp_path):
    """QA round 9, row 42: after a resume, train_results.json and the card stated train_loss (and runtime) of the
    resumed steps only, as the run's. Now train_loss is the mean over every step of the run (the same as the run
    never interrupted), and the resumed process's figures are session_* and labelled with their steps. A checkpoint saved between two logging steps still logs its loss (else the steps since the last log would
    be lost to a kill)."""
    import re

    out = tmp_path / "out"
    args = ["--config", str(TINY_DEMO), "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
            "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
            "--load_best_model_at_end", "false", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--dataloader_num_workers", "0", "--lr_scheduler_type", "constant", "--save_total_limit", "5"]
    sft.main(*sft.parse_args(args + ["--max_steps", "4", "--logging_steps", "3"]))
    first = json.loads((out / "train_results.json").read_text())
    logged = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in logged if "loss" in h] == [2]  # logged at the save, not only at step 3
    windows = {h["step"]: h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
               if "loss" in h}
    assert sorted(windows) == [2, 3, 4]
    steps_1_to_4 = windows[2] * 2 + windows[3] + windows[4]
    assert first["train_loss"] == pytest.approx(steps_1_to_4 / 4, rel=1e-6)
    assert "Training run: " in (out / "README.md").read_text()

    sft.main(*sft.parse_args(args + ["--max_steps", "8"]))  # resumes at checkpoint-4
    results = json.loads((out / "train_results.json").read_text())
    windows = {h["step"]: h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
               if "loss" in h and h["step"] > 4}
    assert sorted(windows) == [6, 8]  # every 3 steps (the run's logging_steps) and at the saves
    assert results["session_train_loss"] == pytest.approx((windows[6] + windows[8]) / 2, rel=1e-6)
    assert results["resumed_from_step"] == 4 and results["global_step"] == 8
    assert "train_runtime" not in results and results["session_train_runtime"] > 0
    assert json.loads((out / "all_results.json").read_text()) == results  # no figure of the first session left
    # the same run never interrupted: the same loss (the tester's comparison)
    sft.main(*sft.parse_args(args + ["--max_steps", "8", "--logging_steps", "3", "--output_dir", str(tmp_path / "ref")]))
    reference = json.loads((tmp_path / "ref" / "train_results.json").read_text())
    assert results["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4)
    assert results["train_loss"] == pytest.approx((steps_1_to_4 + 2 * windows[6] + 2 * windows[8]) / 8, rel=1e-6)
    card = (out / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("Training run"))
    assert line.startswith("Training run (steps 1-8, resumed from a checkpoint at step 4): ")
    assert f"train_loss {results['train_loss']:.4g}" in line.split("This session only")[0]
    session = line.split("This session only (steps 5-8): ")[1]
    assert f"train_loss {results['session_train_loss']:.4g}" in session and "train_runtime" in session
    assert re.search(r"train_runtime", line.split("This session only")[0]) is None


# ---------------------------------------------------------------- QA round 9, rows 92-95, 78, 79: resume and finish
def _fake_checkpoint(folder: Path, step: int, *, adapter: bool = False) -> Path:
    """A complete-looking checkpoint folder (trainer_state.json and a weights file) for the run guard's checks."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0}))
    if adapter:
        (folder / "adapter_model.safetensors").write_bytes(b"adapter")
        (folder / "adapter_config.json").write_text("{}")
    else:
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / "config.json").write_text("{}")
    return folder


def test_a_checkpoint_of_another_run_or_of_no_recorded_run_is_not_resumed(tmp_path, monkeypatch):
    """QA round 9, rows 92-94: a new output_dir with --resume_from_checkpoint of a run on ANOTHER dataset (or a GRPO
    run) continued that run's weights and optimizer at step 21 while the card credited this dataset with all 25
    steps; a missing checkpoint ended in a `Can't find a valid checkpoint` traceback; one of the demo's unrecorded
    run was refused with a message naming the new empty folder as holding it. Now a checkpoint outside output_dir is
    resumed only when its folder's ctiqa_run.json is this run's; everything else is one line naming the checkpoint,
    and nothing is written."""
    monkeypatch.chdir(tmp_path)  # the recipe's runs/demo/dataset: absent here, as before `make demo` in a checkout
    this = _config(tmp_path)
    other_dir = tmp_path / "other"
    training.prepare_output_dir(other_dir, _config(tmp_path, "--dataset_name", str(tmp_path / "dsT")))
    other = _fake_checkpoint(other_dir / "checkpoint-20", 20)
    out = tmp_path / "new"
    with pytest.raises(training.CTIQAError, match=rf"^resume_from_checkpoint {other} is a checkpoint of another run "
                                                  r"\(dataset_name '.*/dsT' -> '.*/runs/demo/dataset'\): resuming "
                                                  "it would continue that run's weights"):
        training.prepare_output_dir(out, this, resume_from_checkpoint=str(other), max_steps=25)
    # a GRPO run's checkpoint: the recipe kind is named first
    grpo_dir = tmp_path / "grpo"
    grpo_dir.mkdir()
    (grpo_dir / training.RUN_CONFIG_FILE).write_text(json.dumps({**this, "recipe": "grpo", "beta": 0.0}))
    grpo_ckpt = _fake_checkpoint(grpo_dir / "checkpoint-6", 6)
    with pytest.raises(training.CTIQAError, match=r"is a checkpoint of another run \(recipe 'grpo' -> 'sft', and 1 "
                                                  r"other setting\)"):
        training.prepare_output_dir(out, this, resume_from_checkpoint=str(grpo_ckpt), max_steps=25)
    older = {k: v for k, v in this.items() if k != "recipe"} | {"reward_funcs": ["score_reward"]}
    (grpo_dir / training.RUN_CONFIG_FILE).write_text(json.dumps(older))  # recorded before the kind was: by rewards
    with pytest.raises(training.CTIQAError, match=r"another run \(recipe 'grpo' -> 'sft', and 1 other setting\)"):
        training.prepare_output_dir(out, this, resume_from_checkpoint=str(grpo_ckpt), max_steps=25)
    # no record (the demo's model folder, a run of an older ctiqa): cannot tell
    bare = _fake_checkpoint(tmp_path / "demo" / "model" / "checkpoint-1080", 1080)
    with pytest.raises(training.CTIQAError, match=rf"^resume_from_checkpoint {bare}: no ctiqa_run.json in "
                                                  r".*/demo/model: cannot tell which run it belongs to.*give it as "
                                                  "--model_name_or_path"):
        training.prepare_output_dir(out, this, resume_from_checkpoint=str(bare), max_steps=25)
    # missing, incomplete
    with pytest.raises(training.CTIQAError, match=r"^resume_from_checkpoint .*/nonexist/checkpoint-5: no such folder"):
        training.prepare_output_dir(out, this, resume_from_checkpoint=str(tmp_path / "nonexist" / "checkpoint-5"))
    cut = tmp_path / "other" / "checkpoint-30"
    cut.mkdir()
    with pytest.raises(training.CTIQAError, match=r"checkpoint-30: not a complete training checkpoint \(no "
                                                  "trainer_state.json"):
        training.prepare_output_dir(out, this, resume_from_checkpoint=str(cut))
    assert not out.exists()  # nothing written by any refusal

    # the same run continued from another folder: accepted; too few steps names the checkpoint, not the new folder
    same_dir = tmp_path / "same"
    training.prepare_output_dir(same_dir, this)
    same = _fake_checkpoint(same_dir / "checkpoint-20", 20)
    with pytest.raises(training.CTIQAError, match=rf"^resume_from_checkpoint {same} holds this run trained to 20 "
                                                  r"steps; --max_steps 10 asks for fewer"):
        training.prepare_output_dir(out, this, resume_from_checkpoint=str(same), max_steps=10)
    assert training.prepare_output_dir(out, this, resume_from_checkpoint=str(same), max_steps=25) == str(same)


def test_a_checkpoint_of_the_other_kind_is_one_line_before_the_model_loads(tiny, tmp_path):
    """QA round 9, row 93: a QLoRA adapter checkpoint given to a full fine-tune ended in the Trainer's `Can't find a
    checkpoint index` traceback after everything had loaded; the reverse in `Can't find a valid checkpoint`."""
    _, train_args, model_args = sft.parse_args(["--config", str(TINY_DEMO), "--model_name_or_path", str(tiny),
                                                "--use_peft", "false"])
    adapter = _fake_checkpoint(tmp_path / "qlora" / "checkpoint-12", 12, adapter=True)
    with pytest.raises(training.CTIQAError, match=r"checkpoint-12: holds no full model \(config.json and "
                                                  r"model\*.safetensors\), only a LoRA adapter, and this run "
                                                  r"fine-tunes the full model"):
        training.load_model(model_args, train_args, checkpoint=str(adapter))
    _, train_args, model_args = sft.parse_args(["--config", str(TINY_QLORA), "--model_name_or_path", str(tiny)])
    full = _fake_checkpoint(tmp_path / "full" / "checkpoint-3", 3)
    with pytest.raises(training.CTIQAError, match=r"checkpoint-3: holds no LoRA adapter"):
        training.load_model(model_args, train_args, checkpoint=str(full))


@pytest.mark.parametrize("extra", [["--hub_token", "hf_SECRETCLI_q9"],
                                   ["--model_init_kwargs", '{"token": "hf_SECRETCLI_q9"}']],
                         ids=["hub_token", "model_init_kwargs"])
def test_a_token_in_the_arguments_is_refused_before_anything_is_written(extra, tmp_path, capsys):
    """QA round 9, row 79: `--hub_token hf_...` was accepted (and not used: the push reads HF_TOKEN) and written in
    plain text into training_args.bin in output_dir and every checkpoint (the Trainer pickles its arguments)."""
    out = tmp_path / "out"
    with pytest.raises(training.CTIQAError, match=r"a token is never taken from the command line or a recipe .*"
                                                  r"set HF_TOKEN or run `hf auth login`") as e:
        sft.main(*sft.parse_args(["--config", str(TINY_DEMO), "--output_dir", str(out), "--push_to_hub", "true",
                                  *extra]))
    assert "SECRETCLI" not in str(e.value) and "SECRETCLI" not in "".join(capsys.readouterr())
    assert not out.exists()


def _evaluation_of(folder: Path) -> dict:
    """A results.json as `ctiqa evaluate --model FOLDER` writes it (what the card reads)."""
    from ctiqa.model_settings import weights_fingerprint

    here = os.path.realpath(folder)
    return {"kind": "model", "name": "the model", "dataset": "ds", "split": "test", "counts": {"n": 4},
            "metrics": {"parsed": {"srcc": 0.4321, "srcc_ci": [0.1, 0.7], "mae": 0.9876}},
            "provenance": {"local_paths": {"model": here},
                           "settings": {"model_weights": weights_fingerprint(folder)}}}


@pytest.mark.parametrize("recipe", [TINY_DEMO, TINY_QLORA], ids=["full-fine-tuning", "qlora"])
def test_a_run_killed_between_its_last_checkpoint_and_its_model_is_finished_by_the_same_command(
        recipe, tiny, dataset_dir, tmp_path, fake_hub):
    """QA round 9, rows 95 and 78. Killed in the few ms after the last checkpoint (= max_steps) was saved and before
    the model, card and DONE were: the same command was refused ("ask for more steps ... or
    --overwrite_output_dir"), so the run's model could never be produced. Now it saves the model from that
    checkpoint (its weights, verified), with the card and DONE, exit 0, training nothing. Then, on the finished
    run, the same command with --eval_results (an evaluation of exactly these weights) puts its table in the card
    before the push retry, as recipes/README.md promises; an evaluation of another model is still left out."""
    import re

    out = tmp_path / "out"
    args = ["--config", str(recipe), "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
            "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
            "--load_best_model_at_end", "false", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--dataloader_num_workers", "0", "--max_steps", "4", "--logging_steps", "1"]
    sft.main(*sft.parse_args(args))
    reference = _saved_state(out)
    assert (out / "adapter_model.safetensors").is_file() == (recipe == TINY_QLORA)
    loss = json.loads((out / "train_results.json").read_text())["train_loss"]
    # the folder as the kill leaves it: checkpoints, the run record, the results; no model, settings, card or DONE
    for f in out.iterdir():
        if f.is_file() and f.name not in (training.RUN_CONFIG_FILE, "train_results.json", "all_results.json"):
            f.unlink()
    checkpoints = _files(out / "checkpoint-4")
    proc = subprocess.run([sys.executable, str(SFT), *args], cwd=REPO, env={**os.environ, **OFFLINE},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "saving the model from it (nothing is trained)" in proc.stdout
    assert "*** Train ***" not in proc.stdout
    final = _saved_state(out)
    assert set(final) == set(reference) and all(torch.equal(final[k], reference[k]) for k in reference)
    assert (out / "DONE").is_file() and (out / "ctiqa_training.json").is_file()
    assert _files(out / "checkpoint-4") == checkpoints and not (out / "checkpoint-5").exists()
    card = (out / "README.md").read_text()
    assert re.findall(r"\| steps trained \| (\d+) \|", card) == ["4"]
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 4 and results["train_loss"] == pytest.approx(loss, rel=1e-6)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert "No evaluation was attached" in card
    if recipe == TINY_QLORA:
        return

    # row 78: the finished run's command again with an evaluation of these weights: the card shows it, then the push
    finished = _files(out)
    (tmp_path / "elsewhere.json").write_text(json.dumps(_evaluation_of(tmp_path)))  # another model's
    with pytest.raises(training.AlreadyTrained, match="nothing to do$"):
        sft.main(*sft.parse_args(args + ["--eval_results", str(tmp_path / "elsewhere.json")]))
    assert _files(out) == finished
    evaluation = tmp_path / "results.json"
    evaluation.write_text(json.dumps(_evaluation_of(out)))
    with pytest.raises(training.AlreadyTrained, match=r"nothing to do; the card's evaluation section now shows .*"
                                                      r"results.json; pushed it to .*tester/eval"):
        sft.main(*sft.parse_args(args + ["--eval_results", str(evaluation), "--push_to_hub", "true",
                                         "--hub_model_id", "tester/eval"]))
    card = (out / "README.md").read_text()
    assert "| parsed | SRCC | 0.4321 | [0.100, 0.700] |" in card and "No evaluation was attached" not in card
    assert {k: v for k, v in _files(out).items() if k != "README.md"} == \
        {k: v for k, v in finished.items() if k != "README.md"}
    assert fake_hub.files("tester/eval")["README.md"].decode() == card
    assert card.endswith(finished["README.md"].decode().split("## Evaluation")[1].split("## Licence")[1])


# -------------------------------------------------------------------------------- the test split, output_dir lock
@pytest.mark.parametrize("extra, message", [
    (["--dataset_train_split", "test"],
     r"^dataset_train_split test: the 'test' split is held out for `ctiqa evaluate`, which reports on it; training "
     r"on it would make that evaluation meaningless. Train on 'train' \(the default\)$"),
    (["--dataset_test_split", "test", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
      "--save_steps", "2", "--max_steps", "4"],
     r"^dataset_test_split test: that argument names the split evaluated during training and used for model "
     r"selection; the 'test' split is held out for `ctiqa evaluate` and never read in training. Use 'validation'"),
], ids=["train-on-test", "select-on-test"])
def test_the_test_split_is_never_trained_or_selected_on(extra, message, tmp_path):
    """QA round 9, rows 114 and 115: `--dataset_train_split test` trained on the test images, and `--dataset_test_split
    test --eval_strategy steps` selected the checkpoint on them (the card still said "validation"), exit 0 both, and
    the card sent the user to `ctiqa evaluate` on "the held-out test split". Both are refused in one line before
    anything loads: here the model and dataset do not even exist, and nothing is written (no lock either)."""
    out = tmp_path / "out"
    with pytest.raises(training.CTIQAError, match=message):
        sft.main(*sft.parse_args(["--config", str(TINY_DEMO), "--model_name_or_path", str(tmp_path / "no-model"),
                                  "--dataset_name", str(tmp_path / "no-data"), "--output_dir", str(out), *extra]))
    assert list(tmp_path.iterdir()) == []
    # a test split named but never read (nothing evaluated during training) is no use of it
    script, train_args, _ = sft.parse_args(["--config", str(TINY_DEMO), "--dataset_test_split", "test",
                                            "--eval_strategy", "no", "--load_best_model_at_end", "false"])
    training.check_splits(script, train_args)
    assert training.evaluation_split(script, train_args) is None


def test_the_card_names_the_splits_the_run_trained_and_selected_on(tiny, tmp_path):
    """QA round 9, row 115: the card's "model selection" line said "the validation split" whatever split was
    evaluated. It now names the splits read from the run's arguments: here a dataset whose selection split is
    called `dev`. The run's output_dir lock is released when it ends (a later run takes it)."""
    from filelock import FileLock

    data = write_dataset(tmp_path / "ds", {"train": 8, "dev": 4, "test": 2})
    out = tmp_path / "out"
    sft.main(*sft.parse_args([
        "--config", str(TINY_DEMO), "--model_name_or_path", str(tiny), "--dataset_name", str(data),
        "--output_dir", str(out), "--dataset_test_split", "dev", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--dataloader_num_workers", "0"]))
    card = (out / "README.md").read_text()
    assert "| data splits | trained on `train`; evaluated during training on `dev` |" in card
    assert "| model selection | best eval_loss on the `dev` split |" in card
    assert "validation split" not in card and "`validation`" not in card
    lock = FileLock(os.path.realpath(out) + ".lock", timeout=0)
    lock.acquire()  # released by the run: taken at once (Timeout otherwise)
    lock.release()


def test_a_second_launch_into_the_output_dir_of_a_running_one_is_refused_before_writing(tiny, dataset_dir, tmp_path,
                                                                                      monkeypatch):
    """QA round 9, row 122: the same sft command started twice on one output_dir both trained and wrote checkpoints
    into it (the second "resumed" from the first's checkpoint while it was still writing). A run now holds
    `<output_dir>.lock` for its whole life, as `ctiqa predict --out` / `build-dataset --out` hold theirs; a second
    launch is refused in one line, nothing written. Only the main process of a launch takes it, so the other
    processes of the same multi-process launch go on."""
    from ctiqa.testing import lock_held_elsewhere

    out = Path(os.path.realpath(tmp_path)) / "out"
    args = ["--config", str(TINY_DEMO), "--model_name_or_path", str(tiny), "--dataset_name", str(dataset_dir),
            "--output_dir", str(out), "--max_steps", "2", "--report_to", "none"]
    with lock_held_elsewhere(out):
        with pytest.raises(training.CTIQAError, match=rf"^output_dir {out}: another recipes/sft.py run is writing it "
                                                      rf"\(locked by {out}.lock\); wait for it to finish or choose "
                                                      r"another output_dir$"):
            sft.main(*sft.parse_args(args))
        assert not out.exists()
        _, train_args, _ = sft.parse_args(args)
        monkeypatch.setattr(type(train_args), "process_index", property(lambda self: 1))
        with training.output_dir_lock(train_args, "recipes/sft.py"):  # rank 1 of a launch: not refused
            pass
    assert not out.exists()


def test_an_unfinished_run_leaves_a_card_that_says_so(tmp_path):
    """QA round 13: a run stopped after a checkpoint (NaN, kill -9, crash) left TRL's generic card: "a fine-tuned
    version of [None]", a quick start loading model="None". Every checkpoint save now replaces it with a card saying
    the run is unfinished; ctiqa's card replaces that at the end."""
    from types import SimpleNamespace

    (tmp_path / "README.md").write_text("This model is a fine-tuned version of [None](https://huggingface.co/None).")
    state = SimpleNamespace(is_world_process_zero=True, global_step=4, max_steps=12)
    training.UnfinishedRunCard().on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    card = (tmp_path / "README.md").read_text()
    assert "Unfinished ctiqa training run" in card and "step 4 of 12" in card and "None" not in card
    # QA round 14: a kill between TRL's card and this one left TRL's: the trainers write no generic card now
    trainer = SimpleNamespace(create_model_card=lambda **kw: (tmp_path / "README.md").write_text("None"))
    training.without_generic_card(trainer).create_model_card(model_name="x")
    assert "Unfinished ctiqa training run" in (tmp_path / "README.md").read_text()


def test_settings_that_change_what_is_learned_are_part_of_the_run(tmp_path, monkeypatch):
    """QA round 13: label_smoothing_factor, neftune_noise_alpha and adam_beta1 were not in ctiqa_run.json: a re-run
    changing one resumed the old run silently. A record written before they were recorded still resumes."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert training.prepare_output_dir(out, _config(tmp_path)) is None
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    for flag, value in (("--label_smoothing_factor", "0.1"), ("--neftune_noise_alpha", "5"), ("--adam_beta1", "0.5")):
        with pytest.raises(training.CTIQAError, match=rf"holds another run \({flag[2:]} "):
            training.prepare_output_dir(out, _config(tmp_path, flag, value))
    record = json.loads((out / training.RUN_CONFIG_FILE).read_text())
    for k in ("label_smoothing_factor", "neftune_noise_alpha", "adam_beta1"):
        del record[k]  # as an older ctiqa wrote it
    (out / training.RUN_CONFIG_FILE).write_text(json.dumps(record))
    assert training.prepare_output_dir(out, _config(tmp_path)) == str(out / "checkpoint-4")
