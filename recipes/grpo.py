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
when ``eval_strategy`` is not ``no``; ``test`` is never read here (naming it as ``dataset_train_split`` or
``dataset_test_split`` is refused: it is what ``ctiqa evaluate`` reports on). One run at a time in an ``output_dir``
(a second launch into it is refused: ``<output_dir>.lock``).

Outputs in ``output_dir``: the adapter (when starting from an adapter or with ``use_peft``) or the full model, the
processor, ``README.md`` (our model card), ``ctiqa_training.json`` (how it was trained, read by ``ctiqa evaluate`` /
``ctiqa predict``), ``ctiqa_run.json`` (what defines the run), ``train_results.json``, ``trainer_state.json``
(rewards per step), TensorBoard logs, checkpoints, and ``DONE``. A re-run of the same run resumes from the last
complete checkpoint with its weights when it asks for more steps than done (as many, finished: "nothing to do";
fewer: refused); another run is refused there (``--overwrite_output_dir true`` starts over).
Shared helpers (parsing, run guard, resume, model loading, NaN guard, settings, card, push): :mod:`ctiqa.training`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import GRPOConfig, GRPOTrainer, ModelConfig

from ctiqa import CTIQAError, rewards, training
from ctiqa.model_settings import read_settings

logger = logging.getLogger("ctiqa.grpo")
#: The Hub commit message of a push.
GRPO_COMMIT = "ctiqa GRPO: adapter/model, processor, settings and model card"

#: The recipe used when no --config is given.
DEFAULT_RECIPE = Path(__file__).resolve().parent / "medgemma-4b-it" / "grpo" / "config_qlora.yaml"
FINDINGS_SOURCES = ("auto", "truth", "measured")
last_complete_checkpoint = training.last_complete_checkpoint


@dataclass
class ScriptArguments(training.ScriptArguments):
    """TRL's script arguments, ctiqa's (``eval_results``, ``overwrite_output_dir``) and this script's: rewards,
    reference findings, generation backend."""

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
    false_streak_cost: float = field(default=1.0, metadata={
        "help": "faithfulness_reward: the streak term for streaks claimed where the reference has none (1: as a "
                "missed streak; more makes false streaks worse than missed ones)."})
    findings: str = field(default="auto", metadata={
        "help": "reference findings for faithfulness_reward: truth (simulated data), measured, or auto."})
    vllm: str = field(default="auto", metadata={
        "help": "Generation: auto (vLLM colocate when vllm is installed, on a GPU, and the base is not 4-bit; "
                "transformers generate otherwise), on (use_vllm as set in GRPOConfig), off (transformers generate)."})
    base_model: str | None = field(default=None, metadata={
        "help": "Base model for an adapter given as model_name_or_path (default: the adapter's own base)."})


# --------------------------------------------------------------------------------------------------------------
# Rewards and reference findings
# --------------------------------------------------------------------------------------------------------------
def reward_functions(script_args: ScriptArguments) -> list:
    """The ``ctiqa.rewards`` functions named in ``reward_funcs``, their parameters bound from the script arguments
    (``functools.partial``: TRL logs them under the function's own name).

    Raises:
        CTIQAError: an unknown reward name; ``score_tau`` not positive or a cost below 0.
    """
    params = {"score_reward": {"tau": script_args.score_tau},
              "faithfulness_reward": {"silence_cost": script_args.silence_cost,
                                      "unverified_cost": script_args.unverified_cost,
                                      "false_streak_cost": script_args.false_streak_cost}}
    if not script_args.score_tau > 0:  # found here, not at the first reward call after the model has loaded
        raise CTIQAError(f"--score_tau must be > 0, got {script_args.score_tau}")
    for name, cost in params["faithfulness_reward"].items():
        if cost < 0:
            raise CTIQAError(f"--{name} must be 0 or more, got {cost}")
    out = []
    for name in script_args.reward_funcs:
        if name not in rewards.REWARDS:
            raise CTIQAError(f"unknown reward {name!r}; choose from {', '.join(rewards.REWARDS)}")
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
        CTIQAError: unknown source, or ``truth`` on data without the simulator's columns.
    """
    if source not in FINDINGS_SOURCES:
        raise CTIQAError(f"findings {source!r}: choose one of {', '.join(FINDINGS_SOURCES)}")
    has_truth = {"dose_fraction", "n_views"} <= set(dataset.column_names)
    if source == "auto":
        source = "truth" if has_truth else "measured"
    if source == "truth" and not has_truth:
        raise CTIQAError("findings truth needs the simulator's dose_fraction and n_views columns (simulated data); "
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

    import torch

    if script_args.vllm not in ("auto", "on", "off"):
        raise CTIQAError(f"vllm {script_args.vllm!r}: choose auto, on or off")
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


#: LoRA fields of ModelConfig and the adapter_config.json keys that set them.
_LORA_FIELDS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                "lora_target_modules": "target_modules", "use_rslora": "use_rslora", "use_dora": "use_dora"}


def adapter_lora_settings(model_args: ModelConfig) -> None:
    """When ``model_name_or_path`` is a LoRA adapter (trained further as it is), set the recipe's LoRA fields to
    the adapter's own (its ``adapter_config.json``), so that the run record and the card state the LoRA really
    trained; a recipe value that differs is not used and a warning says so. Anything else: unchanged."""
    if adapter_base(model_args.model_name_or_path) is None:
        return
    from peft import PeftConfig

    cfg = PeftConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    ignored = []
    for field_name, key in _LORA_FIELDS.items():
        value = getattr(cfg, key, None)
        if isinstance(value, set):
            value = sorted(value)
        if value is None or not hasattr(model_args, field_name):
            continue
        given = getattr(model_args, field_name)
        if given is not None and given != value and not (isinstance(given, list) and sorted(given) == value):
            ignored.append(f"{field_name} {given!r} (the adapter's: {value!r})")
        setattr(model_args, field_name, value)
    if ignored:
        logger.warning("the adapter %s is trained further with its own LoRA settings; not used: %s",
                       model_args.model_name_or_path, ", ".join(ignored))


def load_policy(script_args: ScriptArguments, model_args: ModelConfig, training_args: GRPOConfig,
                checkpoint: str | None):
    """The policy to train, the LoRA config for the trainer (None when there is no new adapter), and the base the
    output is used with.

    ``model_name_or_path`` an adapter (the SFT output of a LoRA/QLoRA recipe): its base is loaded as
    :func:`ctiqa.training.load_model` loads a model (4-bit when ``load_in_4bit``; the SFT run's settings file is
    checked for the same choice), the adapter on top with its weights trainable; no new adapter. On resume the
    Trainer restores the adapter from the checkpoint (checked by ``ctiqa.training.VerifyResumedWeights``).
    ``model_name_or_path`` a full model: :func:`ctiqa.training.load_model` (from the checkpoint's weights when
    resuming); ``use_peft`` adds a new adapter.

    Raises:
        CTIQAError: an adapter together with ``use_peft`` (one adapter is trained, not two).
    """
    base = adapter_base(model_args.model_name_or_path)
    if base is None:
        model, peft_config = training.load_model(model_args, training_args, checkpoint=checkpoint)
        # GRPOTrainer builds the KL reference (beta > 0) from the policy's config name: keep it the starting model,
        # not the checkpoint a resumed policy was loaded from (else the reference moves on every resume).
        model.config._name_or_path = model_args.model_name_or_path
        return model, peft_config, model_args.model_name_or_path
    if model_args.use_peft:
        raise CTIQAError(f"{model_args.model_name_or_path} is a LoRA adapter: GRPO trains it further; set use_peft "
                         "false (a second adapter on top is not supported)")
    from peft import PeftModel

    base = script_args.base_model or base
    sft = read_settings(model_args.model_name_or_path) if Path(model_args.model_name_or_path).is_dir() else None
    if sft is not None and sft.load_in_4bit is not None and bool(sft.load_in_4bit) != bool(model_args.load_in_4bit):
        logger.warning("the SFT adapter was trained on a %s base; this recipe loads it %s",
                       "4-bit" if sft.load_in_4bit else "full-precision",
                       "in 4 bit" if model_args.load_in_4bit else "in full precision")
    model, _ = training.load_model(dataclasses.replace(model_args, model_name_or_path=base, model_revision="main",
                                                       use_peft=False), training_args)
    model = PeftModel.from_pretrained(model, model_args.model_name_or_path, revision=model_args.model_revision,
                                      is_trainable=True)
    return model, None, base


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(script_args: ScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> None:
    """Train with GRPO, save the adapter (or model) with its settings and card, push when asked. See the module
    docstring. ``output_dir`` is locked for the whole run (``<output_dir>.lock``): a second launch into it is
    refused."""
    training.start(script_args, training_args, model_args)
    with training.output_dir_lock(training_args, "recipes/grpo.py"):
        run(script_args, training_args, model_args)


def run(script_args: ScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> None:
    """:func:`main` once the arguments are checked and ``output_dir`` is locked."""
    if not model_args.model_name_or_path:
        raise CTIQAError("no model: pass --model_name_or_path (the SFT output folder or Hub id)")
    funcs = reward_functions(script_args)
    weights = training_args.reward_weights or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise CTIQAError(f"reward_weights has {len(weights)} values for {len(funcs)} reward_funcs "
                         f"{script_args.reward_funcs}")
    generation = choose_generation(script_args, training_args, model_args)
    logger.info("completions generated with %s", generation)
    adapter_lora_settings(model_args)  # before the run record and the card: they state the LoRA that is trained
    config = training.run_config(script_args, training_args, model_args) | {
        "reward_funcs": list(script_args.reward_funcs), "reward_weights": list(weights),
        "score_tau": script_args.score_tau, "silence_cost": script_args.silence_cost,
        "unverified_cost": script_args.unverified_cost, "false_streak_cost": script_args.false_streak_cost,
        "findings": script_args.findings,
        "max_train_samples": script_args.max_train_samples}
    try:
        checkpoint = training.prepare_output_dir(training_args.output_dir, config,
                                                 overwrite=script_args.overwrite_output_dir,
                                                 resume_from_checkpoint=training_args.resume_from_checkpoint,
                                                 max_steps=training_args.max_steps,
                                                 num_train_epochs=training_args.num_train_epochs)
    except training.AlreadyTrained as done:  # nothing to train; a re-run retries a failed push
        training.end_trained_run(done, training_args, commit_message=GRPO_COMMIT,
                                 eval_results=script_args.eval_results)
    if checkpoint is not None:
        logger.warning("checkpoint detected, resuming training at %s", checkpoint)

    # Data: the SFT dataset's prompt + images (+ score, + reference findings for the faithfulness reward)
    dataset = training.load_recipe_dataset(script_args, columns=("prompt", "images", "score"))
    train_dataset = dataset[script_args.dataset_train_split]
    if script_args.max_train_samples:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    findings_source = None
    if "faithfulness_reward" in script_args.reward_funcs:
        train_dataset, findings_source = add_reference_findings(train_dataset, script_args.findings)
        if eval_dataset is not None:
            eval_dataset, _ = add_reference_findings(eval_dataset, script_args.findings)
        logger.info("faithfulness reference findings: %s", findings_source)

    # Model (from the checkpoint's weights when resuming a full model), processor (prompts padded on the left)
    processor = training.load_processor(model_args, training_args)
    processor.tokenizer.padding_side = "left"
    model, peft_config, base = load_policy(script_args, model_args, training_args, checkpoint)
    adapter = peft_config is not None or hasattr(model, "peft_config")
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=training_args, train_dataset=train_dataset,
                          eval_dataset=eval_dataset, processing_class=processor, peft_config=peft_config,
                          callbacks=training.training_callbacks(checkpoint))
    training.without_generic_card(trainer)
    if trainer.accelerator.is_main_process and hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()

    # Train, then save model, processor, settings and card; push once
    metrics = training.train(trainer, checkpoint, len(train_dataset))
    logger.info("*** Save model ***")
    settings = training.trained_settings(
        dataclasses.replace(model_args, model_name_or_path=base), training_args, adapter=adapter,
        **training.data_settings(script_args, train_dataset))
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(training_args.output_dir)
    training.save_outputs(trainer, settings=settings, dataset_name=script_args.dataset_name,
                          model_args=dataclasses.replace(model_args, model_name_or_path=base),
                          eval_results=script_args.eval_results, metrics=metrics, stage="grpo",
                          train_split=script_args.dataset_train_split,
                          eval_split=training.evaluation_split(script_args, training_args), extra_settings={
                              "started from (SFT output)": model_args.model_name_or_path,
                              "rewards (weight)": ", ".join(f"{n} ({w:g})" for n, w in
                                                            zip(script_args.reward_funcs, weights, strict=True)),
                              "faithfulness reference findings": findings_source,
                              "score reward tau": script_args.score_tau,
                              "generations per prompt / temperature": f"{training_args.num_generations} / "
                                                                      f"{training_args.temperature}",
                              "max completion tokens": training_args.max_completion_length,
                              "loss / beta (KL)": f"{training_args.loss_type} / {training_args.beta}",
                              "generation": generation})
    if push_to_hub and trainer.accelerator.is_main_process:
        training.push_output(training_args, adapter=adapter,
                             commit_message=GRPO_COMMIT)
    training.finish(trainer)


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, GRPOConfig, ModelConfig]:
    """Parse ``argv`` (default ``sys.argv[1:]``); without ``--config`` the MedGemma recipe is used.

    Raises:
        ctiqa.CTIQAError: one line naming the recipe and what is wrong with it.
    """
    return training.parse_recipe((ScriptArguments, GRPOConfig, ModelConfig), argv, default_config=DEFAULT_RECIPE)


if __name__ == "__main__":
    sys.exit(training.main_guard(lambda: main(*parse_args())))
