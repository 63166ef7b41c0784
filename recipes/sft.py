"""Supervised fine-tuning of a Gemma 3 vision-language model (MedGemma-4B-IT) to grade CT image quality.

The paper's recipe (4-bit NF4 base + LoRA, TRL's SFTTrainer, loss on the completion only):

    accelerate launch --config_file accelerate_config.yaml recipes/sft.py \\
        --config recipes/medgemma-4b-it/sft/config_qlora.yaml \\
        --dataset_name YOU/ldctiqa-rationales --hub_model_id YOU/medgemma-4b-ctiqa

Without ``--config`` the paper recipe is used. A YAML recipe gives the defaults; every field can be overridden on
the command line (``--learning_rate 1e-4``); ``--help`` lists every field (ScriptArguments, SFTConfig from TRL,
ModelConfig from TRL). A tiny recipe trains for real on the CPU, offline:

    ctiqa tiny-model --out runs/demo/tiny-model
    accelerate launch --cpu --num_processes 1 recipes/sft.py --config recipes/tiny/sft/config_qlora_cpu.yaml

The dataset is a Hub id or a local folder written by ``ctiqa build-dataset`` (a ``DatasetDict`` with ``train`` /
``validation`` / ``test``; columns ``prompt``, ``completion``, ``images``, ``id``, ``score``, ...). Training uses
``train``, model selection uses ``validation`` (eval loss); ``test`` is never read here.

Outputs in ``output_dir``: the adapter (or the full model when ``use_peft`` is false) + processor, ``README.md``
(our model card), ``train_results.json``, ``trainer_state.json`` (loss curve), ``ctiqa_training.json`` (how the base was loaded: 4-bit or not, read by
``ctiqa evaluate --precision auto``), TensorBoard logs in ``runs/``,
checkpoints, and ``DONE`` when everything finished. A re-run resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from datasets import load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

logger = logging.getLogger("ctiqa.sft")

REPO = Path(__file__).resolve().parent.parent
#: The recipe used when no --config is given: the paper's (design notes §3).
PAPER_RECIPE = REPO / "recipes" / "medgemma-4b-it" / "sft" / "config_qlora.yaml"


@dataclass
class ScriptArguments:
    """Data and bookkeeping arguments of this script (training arguments are TRL's SFTConfig, model ones ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id or local folder written by `ctiqa build-dataset` (Hub layout)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Dataset revision (branch, tag, commit)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="validation",
        metadata={"help": "Split evaluated during training, used for model selection (never the test split)."},
    )
    check_examples: bool = field(
        default=True,
        metadata={"help": "Before training, check that every example fits max_length whole (image block and "
                          "target, score included) and has exactly one BOS; fail with the offending ids."},
    )
    eval_results: str | None = field(
        default=None,
        metadata={"help": "results.json of `ctiqa evaluate` to put in the model card (default: "
                          "<output_dir>/results.json when present)."},
    )


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------
def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` holding ``trainer_state.json`` (written last by the
    Trainer, so a checkpoint cut short by a kill is skipped), or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = []
    for d in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        if d.is_dir() and d.name.split("-")[-1].isdigit():
            if (d / "trainer_state.json").is_file():
                steps.append((int(d.name.split("-")[-1]), d))
            else:
                logger.warning("skipping incomplete checkpoint %s (no trainer_state.json)", d)
    return str(max(steps)[1]) if steps else None


def check_examples_fit(dataset, processor, max_length: int | None, split: str, batch_size: int = 16) -> dict:
    """Collate every example exactly as training will (TRL's vision collator, completion-only loss, no truncation)
    and check that it trains on what it should.

    Checks per example: the sequence fits ``max_length`` whole (no image block cut, no target truncated), it holds
    exactly one BOS, the supervised tokens hold no image token and spell the completion text (so the score is
    inside the loss), and ``Score: `` appears there.

    Returns:
        ``{"n": examples, "max_tokens": longest sequence, "max_target_tokens": longest supervised part}``.
    Raises:
        ValueError: naming the split and the offending example ids with what is wrong.
    """
    collator = DataCollatorForVisionLanguageModeling(processor=processor, max_length=None, completion_only_loss=True)
    tok = processor.tokenizer
    image_id = tok.image_token_id
    problems: list[str] = []
    longest = longest_target = 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        ids = [r.get("id", str(start + k)) for k, r in enumerate(rows)]
        targets = [r["completion"][-1]["content"][-1]["text"] for r in rows]
        batch = collator([{k: r[k] for k in ("prompt", "completion", "images")} for r in rows])
        for k, ex_id in enumerate(ids):
            n = int(batch["attention_mask"][k].sum())
            labels = batch["labels"][k]
            supervised = batch["input_ids"][k][labels != -100]
            text = tok.decode(supervised, skip_special_tokens=False)
            longest, longest_target = max(longest, n), max(longest_target, len(supervised))
            n_bos = int((batch["input_ids"][k][batch["attention_mask"][k] == 1] == tok.bos_token_id).sum())
            if max_length is not None and n > max_length:
                problems.append(f"{ex_id}: {n} tokens > max_length {max_length}")
            if n_bos != 1:
                problems.append(f"{ex_id}: {n_bos} BOS tokens (want exactly 1)")
            if image_id is not None and bool((supervised == image_id).any()):
                problems.append(f"{ex_id}: image tokens inside the supervised tokens")
            if not text.startswith(targets[k].strip()) or "Score: " not in text:
                problems.append(f"{ex_id}: supervised tokens {text[:60]!r} do not spell the target")
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else "")
        raise ValueError(f"split {split!r}: examples that would not train correctly: {shown}")
    return {"n": len(dataset), "max_tokens": longest, "max_target_tokens": longest_target}



def load_model(model_args: ModelConfig, training_args: SFTConfig):
    """The model to train, and the LoRA config (None for full fine-tuning).

    4-bit NF4 when ``load_in_4bit`` (bitsandbytes; compute dtype = ``dtype``, storage ``bnb_4bit_quant_storage``),
    one full copy per process on its own GPU (``device_map={"": local rank}``: ``"auto"`` breaks DDP; none under
    FSDP, which loads on the CPU and shards), the CPU otherwise. LoRA targets default to peft's ``all-linear`` (every linear layer but ``lm_head``, vision included).
    """
    quantization_config = get_quantization_config(model_args)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    device_map = None  # CPU, or FSDP (it loads on the CPU and shards; needs bf16 4-bit storage for QLoRA)
    if quantization_config is not None and torch.cuda.is_available() and not fsdp:
        device_map = {"": training_args.local_process_index}
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        quantization_config=quantization_config,
        device_map=device_map,
    )
    model.config.use_cache = not training_args.activation_checkpointing
    if not model_args.use_peft:
        return model, None
    if model_args.lora_target_modules in (["all-linear"], "all-linear", None):
        model_args.lora_target_modules = "all-linear"  # peft's shorthand must be a string, not a list
    return model, get_peft_config(model_args)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    """Train, save the adapter (or model) with its card, push when asked. See the module docstring."""
    set_seed(training_args.seed)
    # The Trainer would push every checkpoint with its own card; we push once, at the end, with ours.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

    ###############
    # Setup logging
    ###############
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning("process rank %s, device %s, world size %s, bf16 %s", training_args.process_index,
                   training_args.device, training_args.world_size, training_args.bf16)
    logger.info("model arguments %s", model_args)
    logger.info("script arguments %s", script_args)

    if not script_args.dataset_name:
        raise ValueError("no dataset: pass --dataset_name (Hub id or folder written by `ctiqa build-dataset`)")
    if not model_args.model_name_or_path:
        raise ValueError("no model: pass --model_name_or_path (Hub id or local folder)")
    last_checkpoint = None
    if training_args.resume_from_checkpoint is None:
        last_checkpoint = last_complete_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.info("checkpoint detected, resuming training at %s", last_checkpoint)

    ###############
    # Load datasets
    ###############
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                           revision=script_args.dataset_revision)
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split not in dataset:
            raise ValueError(f"dataset {script_args.dataset_name}: no split {split!r} (has {list(dataset)})")
    train_dataset = dataset[script_args.dataset_train_split]
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    missing = {"prompt", "completion", "images"} - set(train_dataset.column_names)
    if missing:
        raise ValueError(f"dataset {script_args.dataset_name}: missing columns {sorted(missing)} "
                         "(expected the output of `ctiqa build-dataset`)")

    ################
    # Load processor
    ################
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    if script_args.check_examples:
        for name, ds in ((script_args.dataset_train_split, train_dataset),
                         (script_args.dataset_test_split, eval_dataset)):
            if ds is not None:
                stats = check_examples_fit(ds, processor, training_args.max_length, name)
                logger.info("split %s: %s", name, stats)

    ############
    # Load model
    ############
    model, peft_config = load_model(model_args, training_args)

    ############################
    # Initialize the SFT Trainer
    ############################
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    if trainer.accelerator.is_main_process and hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()

    ###############
    # Training loop
    ###############
    logger.info("*** Train ***")
    t0 = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
    metrics = train_result.metrics
    best = trainer.state.best_model_checkpoint
    if peft_config is None and training_args.load_best_model_at_end and best:
        # transformers 5 saves Gemma 3 checkpoints in the legacy key layout, and the Trainer's best-model reload
        # (a non-strict load_state_dict) then matches no key and keeps the last weights with only a warning;
        # from_pretrained converts the keys, so reload the best checkpoint through it.
        best_model = AutoModelForImageTextToText.from_pretrained(best, dtype=trainer.model.dtype)
        trainer.model.load_state_dict(best_model.state_dict())
        logger.warning("reloaded the best checkpoint %s (%s %s) through from_pretrained; the Trainer's "
                       "'missing keys' / 'unexpected keys' warning just above is about its own reload and is "
                       "expected (transformers 5 checkpoint key layout)", best, training_args.metric_for_best_model,
                       trainer.state.best_metric)
    metrics["train_samples"] = len(train_dataset)
    metrics["train_wall_seconds"] = round(time.perf_counter() - t0, 1)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    ##################################
    # Save model and create model card
    ##################################
    logger.info("*** Save model ***")
    if trainer.is_fsdp_enabled:  # gather the sharded adapter into one file (PEFT + FSDP docs)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        from ctiqa.cards import model_card

        results = script_args.eval_results or os.path.join(training_args.output_dir, "results.json")
        card = model_card(
            base_model=model_args.model_name_or_path,
            dataset=script_args.dataset_name,
            training_args=training_args,
            model_args=model_args,
            adapter=peft_config is not None,
            eval_results=json.loads(Path(results).read_text()) if Path(results).is_file() else None,
            train_metrics=metrics,
        )
        card.save(os.path.join(training_args.output_dir, "README.md"))
        # How the base was loaded while the adapter learned: `ctiqa evaluate/predict --precision auto` loads the
        # base the same way (an adapter trained on an NF4 base is evaluated on that NF4 base).
        Path(training_args.output_dir, "ctiqa_training.json").write_text(json.dumps({
            "base_model": model_args.model_name_or_path, "adapter": peft_config is not None,
            "load_in_4bit": bool(model_args.load_in_4bit), "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type,
            "dtype": str(model_args.dtype), "bf16": bool(training_args.bf16)}, indent=2) + "\n")
        Path(training_args.output_dir, "DONE").write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info("model and card saved to %s", training_args.output_dir)

    #############
    # Push to Hub
    #############
    if push_to_hub and trainer.accelerator.is_main_process:
        from huggingface_hub import HfApi

        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        api = HfApi()  # token from HF_TOKEN / `hf auth login`, never from the recipe
        private = training_args.hub_private_repo is not False  # private unless the recipe says otherwise
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        # Top-level files only (no checkpoints, no logs); for an adapter never any base weights.
        ignore = ["checkpoint-*", "checkpoint-*/**", "runs/**", "DONE", "training_args.bin"]
        if peft_config is not None:
            ignore += ["model*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json"]
        api.upload_folder(repo_id=repo_url.repo_id, folder_path=training_args.output_dir, ignore_patterns=ignore,
                          commit_message="ctiqa SFT: adapter, processor and model card")
        logger.info("pushed to %s (private=%s)", repo_url, private)

    multi_process = trainer.accelerator.num_processes > 1
    if hasattr(trainer, "end"):
        trainer.end()
    if multi_process:
        # Everything is saved (and pushed). Leave without freeing the DDP model: gloo's process-group destructor
        # joins its worker threads while holding the GIL, and a worker still releasing its last all-gather's
        # Python tensors waits for the GIL: a deadlock at exit (pytorch/pytorch#56297), seen here in about 1 of 5
        # 2-process CPU runs, after "model and card saved".
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SFTConfig, ModelConfig]:
    """Parse ``argv`` (default ``sys.argv[1:]``) with TrlParser; without ``--config`` the paper recipe is used.

    Raises:
        ValueError: unknown keys in the YAML recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(PAPER_RECIPE), *argv]
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    script_args, training_args, model_args = parse_args()
    main(script_args, training_args, model_args)
