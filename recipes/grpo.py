"""GRPO after SFT: reward close scores, the trained format, and rationales that agree with the image's findings.

Starts from the SFT output (a full model folder, or a LoRA adapter that is trained further on its base) and trains
it with TRL's ``GRPOTrainer`` on the same prompt (ctiqa.prompts, the dataset's ``prompt`` column) and the same
pixels (the dataset's ``images`` column) as SFT:

    accelerate launch --config_file accelerate_config.yaml recipes/grpo.py \\
        --config recipes/medgemma-4b-it/grpo/config_qlora.yaml \\
        --model_name_or_path runs/medgemma-4b-it-ctiqa-qlora --dataset_name YOU/ldctiqa-rationales

    # CPU, offline, from the demo's SFT model (minutes)
    accelerate launch --cpu --num_processes 1 recipes/grpo.py --config recipes/tiny/grpo/config_cpu.yaml

A YAML recipe gives the defaults; every field can be overridden on the command line; ``--help`` lists them all
(ScriptArguments below, TRL's GRPOConfig, TRL's ModelConfig). The rewards are ``ctiqa.rewards`` functions named in
``reward_funcs`` with their weights in ``reward_weights`` (GRPOConfig); TRL logs each one per step as
``rewards/<name>/mean`` (TensorBoard in ``output_dir/runs/``).

Reference findings for the faithfulness reward (``--findings``): ``truth`` (simulated data: the simulator's dose and
views, the classes of the truth-based rubric), ``measured`` (``ctiqa.findings.measure_findings`` on each image,
or the dataset's own ``noise_severity`` / ``streaks`` columns when it has them), ``auto`` (truth when the dataset
has ``dose_fraction`` and ``n_views`` columns, else measured). Training uses ``train``; ``validation`` is evaluated
when ``eval_strategy`` is not ``no``; ``test`` is never read here.

Outputs in ``output_dir``: the adapter (when starting from an adapter or with ``use_peft``) or the full model, the
processor, ``README.md`` (our model card), ``train_results.json``, ``trainer_state.json`` (rewards per step),
``ctiqa_training.json`` (how the base was loaded, read by ``ctiqa evaluate --precision auto``), TensorBoard logs,
checkpoints, and ``DONE``. A re-run with the same ``output_dir`` resumes from the last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
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
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import last_complete_checkpoint, load_model  # noqa: E402  (shared with the SFT recipe)

from ctiqa import rewards  # noqa: E402

logger = logging.getLogger("ctiqa.grpo")

REPO = Path(__file__).resolve().parent.parent
#: The recipe used when no --config is given.
DEFAULT_RECIPE = REPO / "recipes" / "medgemma-4b-it" / "grpo" / "config_qlora.yaml"
FINDINGS_SOURCES = ("auto", "truth", "measured")


@dataclass
class ScriptArguments:
    """Data, reward and bookkeeping arguments (training arguments are TRL's GRPOConfig, model ones ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id or local folder written by `ctiqa build-dataset` (Hub layout)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Dataset revision (branch, tag, commit)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="validation",
        metadata={"help": "Split evaluated during training when eval_strategy is set (never the test split)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N training rows only (quick runs)."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["score_reward", "format_reward", "faithfulness_reward"],
        metadata={"help": f"ctiqa.rewards functions, in the order of reward_weights: {', '.join(rewards.REWARDS)}."},
    )
    score_tau: float = field(default=rewards.SCORE_TAU,
                             metadata={"help": "score_reward temperature: exp(-|error| / tau), score units."})
    silence_cost: float = field(default=rewards.SILENCE_COST, metadata={
        "help": "faithfulness_reward: cost of not mentioning a degradation the reference finds."})
    unverified_cost: float = field(default=rewards.UNVERIFIED_COST, metadata={
        "help": "faithfulness_reward: cost of each artifact claim no measurement checks (ring, motion, metal, ...)."})
    findings: str = field(default="auto", metadata={
        "help": "reference findings for faithfulness_reward: truth (simulated data), measured, or auto."})
    vllm: str = field(default="auto", metadata={
        "help": "Generation: auto (vLLM colocate when vllm is installed, on a GPU, and the base is not 4-bit; "
                "transformers generate otherwise), on (use_vllm as set in GRPOConfig), off (transformers generate)."})
    base_model: str | None = field(default=None, metadata={
        "help": "Base model for an adapter given as model_name_or_path (default: the adapter's own base)."})
    eval_results: str | None = field(
        default=None,
        metadata={"help": "results.json of `ctiqa evaluate` to put in the model card (default: "
                          "<output_dir>/results.json when present)."},
    )


# --------------------------------------------------------------------------------------------------------------
# Rewards and reference findings
# --------------------------------------------------------------------------------------------------------------
def reward_functions(script_args: ScriptArguments) -> list:
    """The ``ctiqa.rewards`` functions named in ``reward_funcs``, their parameters bound from the script arguments
    (``functools.partial``: TRL logs them under the function's own name).

    Raises:
        ValueError: an unknown reward name.
    """
    params = {"score_reward": {"tau": script_args.score_tau},
              "faithfulness_reward": {"silence_cost": script_args.silence_cost,
                                      "unverified_cost": script_args.unverified_cost}}
    out = []
    for name in script_args.reward_funcs:
        if name not in rewards.REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from {', '.join(rewards.REWARDS)}")
        out.append(functools.partial(rewards.REWARDS[name], **params.get(name, {})))
    return out


def add_reference_findings(dataset, source: str):
    """Add the columns :func:`ctiqa.rewards.faithfulness_reward` reads (:data:`ctiqa.rewards.REFERENCE_COLUMNS`).

    Args:
        dataset: a ``datasets.Dataset`` of ``ctiqa build-dataset`` rows.
        source: ``truth`` (needs ``dose_fraction`` and ``n_views`` columns: simulated data), ``measured`` (keeps
            the dataset's ``noise_severity`` / ``streaks`` columns when present, else measures each image), or
            ``auto`` (truth when possible, else measured).
    Returns:
        (the dataset with the columns, the source used).
    Raises:
        ValueError: unknown source, or ``truth`` on data without the simulator's columns.
    """
    if source not in FINDINGS_SOURCES:
        raise ValueError(f"findings {source!r}: choose one of {', '.join(FINDINGS_SOURCES)}")
    has_truth = {"dose_fraction", "n_views"} <= set(dataset.column_names)
    if source == "auto":
        source = "truth" if has_truth else "measured"
    if source == "truth" and not has_truth:
        raise ValueError("findings truth needs the simulator's dose_fraction and n_views columns (simulated data); "
                         "use --findings measured")
    present = set(rewards.REFERENCE_COLUMNS) & set(dataset.column_names)
    if source == "measured" and {"noise_severity", "streaks"} <= present:
        if "streak_severity" not in present:
            dataset = dataset.add_column("streak_severity", [None] * len(dataset))
        return dataset, "measured (dataset columns)"
    dataset = dataset.remove_columns(sorted(present))
    if source == "truth":
        sigma = (dataset["noise_sigma_hu"] if "noise_sigma_hu" in dataset.column_names else [None] * len(dataset))
        ref = [rewards.truth_reference(d, v, s) for d, v, s in
               zip(dataset["dose_fraction"], dataset["n_views"], sigma, strict=True)]
    else:
        ref = [rewards.measured_reference(row["images"][0]) for row in dataset.select_columns(["images"])]
    for col in rewards.REFERENCE_COLUMNS:
        dataset = dataset.add_column(col, [r[col] for r in ref])
    return dataset, source


def choose_generation(script_args: ScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> str:
    """Set ``training_args.use_vllm`` / ``vllm_mode`` from ``--vllm`` and say what generates the completions.

    ``auto`` uses vLLM in colocate mode only when vllm is importable, a GPU is present and the base is not 4-bit:
    TRL pushes the policy's weights into vLLM before each generation (a LoRA policy is merged first, vision-tower
    LoRA included, so nothing of the adapter is dropped), which needs the base in its own dtype; a 4-bit NF4 base
    has packed weights vLLM cannot take, so a QLoRA policy generates with transformers.
    """
    import importlib.util

    if script_args.vllm not in ("auto", "on", "off"):
        raise ValueError(f"vllm {script_args.vllm!r}: choose auto, on or off")
    if script_args.vllm == "off":
        training_args.use_vllm = False
    elif script_args.vllm == "auto":
        training_args.use_vllm = bool(importlib.util.find_spec("vllm") and torch.cuda.is_available()
                                      and not model_args.load_in_4bit)
        if training_args.use_vllm:
            training_args.vllm_mode = "colocate"
    return f"vLLM ({training_args.vllm_mode})" if training_args.use_vllm else "transformers generate"


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder or Hub id (its ``adapter_config.json``), None when ``path`` is not an
    adapter."""
    from peft import PeftConfig

    if Path(path).is_dir() and not (Path(path) / "adapter_config.json").is_file():
        return None
    try:
        return PeftConfig.from_pretrained(path).base_model_name_or_path
    except (ValueError, OSError):
        return None


def load_policy(script_args: ScriptArguments, model_args: ModelConfig, training_args: GRPOConfig):
    """The policy to train and the LoRA config for the trainer (None when there is no new adapter).

    ``model_name_or_path`` an adapter (the SFT output of a LoRA/QLoRA recipe): its base is loaded as the SFT recipe
    loads it (4-bit when ``load_in_4bit``), the adapter on top with its weights trainable; no new adapter.
    ``model_name_or_path`` a full model: loaded as the SFT recipe does; ``use_peft`` adds a new adapter.

    Raises:
        ValueError: an adapter together with ``use_peft`` (one adapter is trained, not two).
    """
    base = adapter_base(model_args.model_name_or_path)
    if base is None:
        return load_model(model_args, training_args)
    if model_args.use_peft:
        raise ValueError(f"{model_args.model_name_or_path} is a LoRA adapter: GRPO trains it further; set "
                         "use_peft false (a second adapter on top is not supported)")
    from peft import PeftModel

    base = script_args.base_model or base
    model, _ = load_model(dataclasses.replace(model_args, model_name_or_path=base, model_revision="main"),
                          training_args)
    model = PeftModel.from_pretrained(model, model_args.model_name_or_path, revision=model_args.model_revision,
                                      is_trainable=True)
    return model, None


def restore_full_model_weights(trainer, checkpoint: str) -> None:
    """Load a full model's weights from ``checkpoint`` through ``from_pretrained``.

    transformers 5 saves Gemma 3 checkpoints in the legacy key layout, and the Trainer's resume (a non-strict
    ``load_state_dict``) then matches no key and keeps the initial weights with only a warning; ``from_pretrained``
    converts the keys. Optimizer, scheduler and RNG states are still restored by the Trainer.
    """
    state = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=trainer.model.dtype).state_dict()
    missing, unexpected = trainer.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{checkpoint}: weights do not match the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    logger.warning("restored the weights of %s through from_pretrained; a 'missing keys' warning from the "
                   "Trainer's own reload below is expected (transformers 5 checkpoint key layout)", checkpoint)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(script_args: ScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> None:
    """Train with GRPO, save the adapter (or model) with its card, push when asked. See the module docstring."""
    set_seed(training_args.seed)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False

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
        raise ValueError("no model: pass --model_name_or_path (the SFT output folder or Hub id)")
    funcs = reward_functions(script_args)
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(training_args.reward_weights)} values for "
                         f"{len(funcs)} reward_funcs {script_args.reward_funcs}")
    generation = choose_generation(script_args, training_args, model_args)
    logger.info("completions generated with %s", generation)
    last_checkpoint = training_args.resume_from_checkpoint
    if last_checkpoint is None:
        last_checkpoint = last_complete_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.warning("checkpoint detected, resuming training at %s", last_checkpoint)

    #######################
    # Data and its findings
    #######################
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                           revision=script_args.dataset_revision)
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split not in dataset:
            raise ValueError(f"dataset {script_args.dataset_name}: no split {split!r} (has {list(dataset)})")
    train_dataset = dataset[script_args.dataset_train_split]
    if script_args.max_train_samples:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    missing = {"prompt", "images", "score"} - set(train_dataset.column_names)
    if missing:
        raise ValueError(f"dataset {script_args.dataset_name}: missing columns {sorted(missing)} "
                         "(expected the output of `ctiqa build-dataset`)")
    findings_source = None
    if "faithfulness_reward" in script_args.reward_funcs:
        train_dataset, findings_source = add_reference_findings(train_dataset, script_args.findings)
        if eval_dataset is not None:
            eval_dataset, _ = add_reference_findings(eval_dataset, script_args.findings)
        logger.info("faithfulness reference findings: %s", findings_source)

    ##################
    # Model, processor
    ##################
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code,
                                              padding_side="left")
    model, peft_config = load_policy(script_args, model_args, training_args)
    is_adapter = peft_config is not None or hasattr(model, "peft_config")

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
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
    if last_checkpoint and not is_adapter:
        restore_full_model_weights(trainer, last_checkpoint)
    logger.info("*** Train ***")
    t0 = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    metrics["train_wall_seconds"] = round(time.perf_counter() - t0, 1)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    ##################################
    # Save model and create model card
    ##################################
    logger.info("*** Save model ***")
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        from ctiqa.cards import model_card

        processor.save_pretrained(training_args.output_dir)
        base = adapter_base(model_args.model_name_or_path)
        base = script_args.base_model or base or model_args.model_name_or_path
        results = script_args.eval_results or os.path.join(training_args.output_dir, "results.json")
        weights = training_args.reward_weights or [1.0] * len(funcs)
        card = model_card(
            base_model=base,
            dataset=script_args.dataset_name,
            training_args=training_args,
            model_args=model_args,
            adapter=is_adapter,
            eval_results=json.loads(Path(results).read_text()) if Path(results).is_file() else None,
            train_metrics=metrics,
            stage="grpo",
            extra_settings={
                "started from (SFT output)": model_args.model_name_or_path,
                "rewards (weight)": ", ".join(f"{n} ({w:g})" for n, w in zip(script_args.reward_funcs, weights,
                                                                             strict=True)),
                "faithfulness reference findings": findings_source,
                "score reward tau": script_args.score_tau,
                "generations per prompt / temperature": f"{training_args.num_generations} / "
                                                        f"{training_args.temperature}",
                "max completion tokens": training_args.max_completion_length,
                "loss / beta (KL)": f"{training_args.loss_type} / {training_args.beta}",
                "generation": generation,
            },
        )
        card.save(os.path.join(training_args.output_dir, "README.md"))
        Path(training_args.output_dir, "ctiqa_training.json").write_text(json.dumps({
            "base_model": base, "adapter": is_adapter, "load_in_4bit": bool(model_args.load_in_4bit),
            "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type, "dtype": str(model_args.dtype),
            "bf16": bool(training_args.bf16), "stage": "grpo", "started_from": model_args.model_name_or_path},
            indent=2) + "\n")
        Path(training_args.output_dir, "DONE").write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info("model and card saved to %s", training_args.output_dir)

    if push_to_hub and trainer.accelerator.is_main_process:
        from huggingface_hub import HfApi

        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        api = HfApi()  # token from HF_TOKEN / `hf auth login`, never from the recipe
        private = training_args.hub_private_repo is not False
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        ignore = ["checkpoint-*", "checkpoint-*/**", "runs/**", "DONE", "training_args.bin"]
        if is_adapter:
            ignore += ["model*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json"]
        api.upload_folder(repo_id=repo_url.repo_id, folder_path=training_args.output_dir, ignore_patterns=ignore,
                          commit_message="ctiqa GRPO: adapter, processor and model card")
        logger.info("pushed to %s (private=%s)", repo_url, private)

    multi_process = trainer.accelerator.num_processes > 1
    if hasattr(trainer, "end"):
        trainer.end()
    if multi_process:  # see recipes/sft.py: gloo's process-group destructor can deadlock at exit
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, GRPOConfig, ModelConfig]:
    """Parse ``argv`` (default ``sys.argv[1:]``) with TrlParser; without ``--config`` the MedGemma recipe is used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(DEFAULT_RECIPE), *argv]
    parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig))
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    script_args, training_args, model_args = parse_args()
    main(script_args, training_args, model_args)
