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
``train``, model selection uses ``validation`` (eval loss); ``test`` is never read here (naming it as
``dataset_train_split`` or ``dataset_test_split`` is refused: it is what ``ctiqa evaluate`` reports on). One run at a
time in an ``output_dir`` (a second launch into it is refused: ``<output_dir>.lock``).

Outputs in ``output_dir``: the adapter (or the full model when ``use_peft`` is false) + processor, ``README.md``
(our model card), ``ctiqa_training.json`` (how it was trained: quantisation, dtypes, render encoding, answer format,
prompt version; read by ``ctiqa evaluate`` / ``ctiqa predict``), ``ctiqa_run.json`` (what defines the run),
``train_results.json``, ``trainer_state.json`` (loss curve), TensorBoard logs in ``runs/``, checkpoints, and
``DONE`` when everything finished. A re-run of the same run resumes from the last complete checkpoint with its
weights when it asks for more steps than done (as many, finished: "nothing to do"; fewer: refused); a run with
other data, model or hyperparameters is refused there (``--overwrite_output_dir true`` starts over). Shared helpers:
:mod:`ctiqa.training`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig, SFTTrainer

from ctiqa import training

logger = logging.getLogger("ctiqa.sft")
#: The Hub commit message of a push.
SFT_COMMIT = "ctiqa SFT: adapter, processor, settings and model card"

#: The recipe used when no --config is given: the paper's (design notes §3).
PAPER_RECIPE = Path(__file__).resolve().parent / "medgemma-4b-it" / "sft" / "config_qlora.yaml"


@dataclass
class ScriptArguments(training.ScriptArguments):
    """TRL's script arguments, ctiqa's (``eval_results``, ``overwrite_output_dir``) and this script's."""

    check_examples: bool = field(
        default=True,
        metadata={"help": "Before training, check that every example fits max_length whole (image block and "
                          "target, score included) and has exactly one BOS; fail with the offending ids."})


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, SFTConfig, ModelConfig]:
    """Parse ``argv`` (default ``sys.argv[1:]``); without ``--config`` the paper recipe is used.

    Raises:
        ctiqa.CTIQAError: one line naming the recipe and what is wrong with it.
    """
    return training.parse_recipe((ScriptArguments, SFTConfig, ModelConfig), argv, default_config=PAPER_RECIPE)


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    """Train, save the adapter (or model) with its settings and card, push when asked. See the module docstring.
    ``output_dir`` is locked for the whole run (``<output_dir>.lock``): a second launch into it is refused."""
    training.start(script_args, training_args, model_args)
    with training.output_dir_lock(training_args, "recipes/sft.py"):
        run(script_args, training_args, model_args)


def run(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    """:func:`main` once the arguments are checked and ``output_dir`` is locked."""
    if training_args.push_to_hub:  # the Trainer would push every checkpoint with its own card; we push once, at the end
        logger.info("push_to_hub: the adapter/model and our card are pushed once, after training (the Trainer's "
                    "per-checkpoint pushes are off)")
    try:
        checkpoint = training.prepare_output_dir(
            training_args.output_dir, training.run_config(script_args, training_args, model_args),
            overwrite=script_args.overwrite_output_dir, resume_from_checkpoint=training_args.resume_from_checkpoint,
            max_steps=training_args.max_steps, num_train_epochs=training_args.num_train_epochs)
    except training.AlreadyTrained as done:  # nothing to train; a re-run retries a failed push
        training.end_trained_run(done, training_args, commit_message=SFT_COMMIT,
                                 eval_results=script_args.eval_results)

    # Data: train on `train`, select on `validation`; check every example trains on what it should
    dataset = training.load_recipe_dataset(script_args)
    train_dataset = dataset[script_args.dataset_train_split]
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
    processor = training.load_processor(model_args, training_args)
    if script_args.check_examples:
        for name, ds in ((script_args.dataset_train_split, train_dataset), (script_args.dataset_test_split,
                                                                            eval_dataset)):
            if ds is not None:
                logger.info("split %s: %s", name, training.check_examples_fit(ds, processor, training_args.max_length, name))

    # Model (from the checkpoint's weights when resuming a full fine-tune), then the trainer
    model, peft_config = training.load_model(model_args, training_args, checkpoint=checkpoint)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processor, peft_config=peft_config,
                         callbacks=training.training_callbacks(checkpoint))
    training.without_generic_card(trainer)
    if trainer.accelerator.is_main_process and hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()

    # Train (the best checkpoint's weights kept), then save model, settings (what inference must reproduce) and card
    metrics = training.train(trainer, checkpoint, len(train_dataset))
    logger.info("*** Save model ***")
    settings = training.trained_settings(model_args, training_args, adapter=peft_config is not None,
                                         **training.data_settings(script_args, train_dataset))
    training.save_outputs(trainer, settings=settings, dataset_name=script_args.dataset_name, model_args=model_args,
                          eval_results=script_args.eval_results, metrics=metrics,
                          train_split=script_args.dataset_train_split,
                          eval_split=training.evaluation_split(script_args, training_args))
    if push_to_hub and trainer.accelerator.is_main_process:
        training.push_output(training_args, adapter=peft_config is not None,
                             commit_message=SFT_COMMIT)
    training.finish(trainer)


if __name__ == "__main__":
    sys.exit(training.main_guard(lambda: main(*parse_args())))
