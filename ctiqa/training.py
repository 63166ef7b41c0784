"""What every ctiqa training recipe shares (``recipes/sft.py``, ``recipes/grpo.py``): parsing a YAML recipe, loading
model and processor, the run guard and resume, the checks that stop a run that would learn nothing or the wrong
thing, and writing the settings, card and push.

A recipe reads top to bottom as::

    script_args, training_args, model_args = parse_recipe((ScriptArguments, SFTConfig, ModelConfig), argv)
    start(script_args, training_args, model_args)            # logging; fp16 / ZeRO-3, numbers, secrets, test split
    with output_dir_lock(training_args, "recipes/sft.py"):   # one run at a time in output_dir, for its whole life
        checkpoint = prepare_output_dir(training_args.output_dir, run_config(...), overwrite=...)
        dataset = load_recipe_dataset(script_args)
        processor = load_processor(model_args, training_args)
        model, peft_config = load_model(model_args, training_args, checkpoint=checkpoint)
        trainer = SFTTrainer(..., callbacks=training_callbacks(checkpoint))
        trainer.train(resume_from_checkpoint=checkpoint)
        save_outputs(trainer, ...)                            # model, settings, card, DONE
        push_output(...)                                      # once, at the end
        finish(trainer)

Resume (issue 9): the Trainer saves a full model through ``save_pretrained``, which writes Gemma 3 weights under the
Hub's original key names (``language_model.model.*``, ``vision_tower.*``), but reloads a checkpoint with a plain
non-strict ``load_state_dict`` that does not convert them back (huggingface/transformers#43701): every key misses
and training continues from the initial weights with only a warning. :func:`load_model` therefore loads a full
model to resume from the checkpoint itself, through ``from_pretrained`` (which converts the key names), and fails
when any weight is missing, unexpected or of another shape. Adapters are saved by PEFT in the model's own key
layout and reloaded by the Trainer; :class:`VerifyResumedWeights` checks every adapter tensor against the checkpoint
file before the first step.

Errors a user can fix (bad recipe, missing dataset, another run in ``output_dir``, fp16, a NaN loss) are raised as
:class:`ctiqa.CTIQAError`; :func:`main_guard` prints them as one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trl
import yaml
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import ctiqa
from ctiqa import CTIQAError
from ctiqa.cards import hub_push
from ctiqa.demo import DEMO_DATASET
from ctiqa.ldctiqa import TEST_SPLIT
from ctiqa.model_settings import (
    BNB_DEFAULT_STORAGE,
    DATASET_FINGERPRINT_PREFIX,
    DONE_FILE,
    RUN_CONFIG_FILE,
    TRAINING_DTYPES,
    TrainedSettings,
    dataset_fingerprint,
    legacy_dataset_fingerprint,
    write_settings,
)
from ctiqa.paths import (
    atomic_write,
    check_dataset_finished,
    check_output_path,
    check_outside_dataset,
    check_source_folder,
    is_local_path,
    lock_output,
)

logger = logging.getLogger("ctiqa.training")

#: The demo's dataset folder and how to make it (named in the error when it is missing).
DEMO_DATASET_HINT = ("`make demo` makes it (or: ctiqa simulate --out runs/demo/ldctiqa-sim && ctiqa build-dataset "
                     "--ldctiqa runs/demo/ldctiqa-sim --teacher template --split base-slice --out runs/demo/dataset)")


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's script arguments (dataset name, config, splits...) plus what every ctiqa recipe adds."""

    dataset_revision: str | None = field(default=None, metadata={"help": "Dataset revision (branch, tag, commit)."})
    dataset_test_split: str = field(
        default="validation",
        metadata={"help": "Split evaluated during training, used for model selection (never the test split: "
                          "refused)."})
    eval_results: str | None = field(
        default=None,
        metadata={"help": "results.json of `ctiqa evaluate` to put in the model card (default: "
                          "<output_dir>/results.json when present); left out, with a warning, unless it evaluated "
                          "exactly the weights this run saves (ctiqa.evaluation.not_an_evaluation_of)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds another run: its checkpoints and DONE marker are "
                          "deleted. Without it such a run is refused, naming what differs; the same run resumes."})


class AlreadyTrained(Exception):
    """Raised by :func:`prepare_output_dir` when ``output_dir`` holds this run, finished, trained to exactly the steps
    asked: nothing to do (:func:`main_guard` prints the message and exits 0; no file is touched)."""


# ------------------------------------------------------------------------------------------------------ parsing
class _RecipeParser(trl.TrlParser):
    """TrlParser whose errors are raised (one line) instead of printing the usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:  # argparse's documented override point
        raise CTIQAError(message)


def _simple_type(annotation: Any) -> type | None:
    """int / float / bool / str for annotations like ``int``, ``float | None``, ``Optional[str]``; else None."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation.split(" |")[0].strip())
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(
        annotation) is typing.Union else ()
    if args:
        real = [a for a in args if a is not type(None)]
        annotation = real[0] if len(real) == 1 else None
    return annotation if annotation in (int, float, bool, str) else None


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's ``SafeLoader`` that refuses a key given twice in one mapping: PyYAML (and so TRL's parser) keeps the
    last value silently, and a recipe with ``learning_rate`` twice would train with whichever came last.

    Raises:
        CTIQAError: "line N: key 'K' is given twice (first on line M)" (lines counted from 1).
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise CTIQAError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (first on line "
                                     f"{first}); keep one")
        return super().construct_mapping(node, deep=deep)


def load_recipe_yaml(path: str | Path) -> Any:
    """The content of a YAML recipe, read with :class:`RecipeLoader` (safe, duplicate keys refused).

    Raises:
        CTIQAError: a key given twice (the line is named); yaml.YAMLError: not valid YAML.
    """
    return yaml.load(Path(path).read_text(), Loader=RecipeLoader)


def _check_yaml_types(config_path: str, parsed: tuple) -> None:
    """Every key of the YAML recipe has the type of its field (argparse converts strings only, so ``lora_r: 16.5``
    or ``use_peft: [true]`` would pass through unchecked)."""
    config = load_recipe_yaml(config_path) or {}
    hints = {}
    for obj in parsed:  # the declared annotations: HfArgumentParser rewrites dataclasses.Field.type while parsing
        names = {f.name for f in dataclasses.fields(obj)}
        hints.update({k: v for k, v in typing.get_type_hints(type(obj)).items() if k in names})
    for key, value in config.items():
        if key not in hints or value is None:
            continue
        want = _simple_type(hints[key])
        ok = want is None or isinstance(value, want) and not (want in (int, float) and isinstance(value, bool)) \
            or (want is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise CTIQAError(f"{config_path}: {key}: {value!r} must be of type {want.__name__}")


def parse_recipe(dataclass_types: tuple, argv: list[str] | None = None, default_config: str | Path | None = None):
    """Parse ``argv`` (default ``sys.argv[1:]``) with TRL's parser: a YAML recipe (``--config``) gives the defaults,
    the command line overrides them; ``--help`` lists every field.

    Args:
        dataclass_types: e.g. ``(ScriptArguments, SFTConfig, ModelConfig)``.
        default_config: recipe used when ``--config`` is not given (None: none).
    Returns:
        one instance per dataclass type, as ``TrlParser.parse_args_and_config``.
    Raises:
        CTIQAError: one line naming the recipe and what is wrong: missing or unreadable file, not a YAML mapping,
            unknown key, a key given twice, a value of the wrong type, an invalid setting.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv and default_config is not None:
        argv = ["--config", str(default_config), *argv]
    config = argv[argv.index("--config") + 1] if "--config" in argv and argv.index("--config") + 1 < len(argv) \
        else None
    where = config or "command line"
    if config is not None and not Path(config).is_file():
        raise CTIQAError(f"{config}: no such recipe file")
    try:
        if config is not None:
            load_recipe_yaml(config)  # TRL's parser reads it with yaml.safe_load, where the last duplicate key wins
        parsed = _RecipeParser(dataclass_types, allow_abbrev=False).parse_args_and_config(argv)
    except CTIQAError as e:  # argparse: "argument --learning_rate/--learning-rate: invalid float value: 'fast'";
        # RecipeLoader: "line 53: key 'learning_rate' is given twice (first on line 32); keep one"
        msg = re.sub(r"argument --(\w+)(/--[\w-]+)?: ", r"\1: ", str(e))
        raise CTIQAError(f"{where}: {msg}") from None
    except yaml.YAMLError as e:
        raise CTIQAError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (ValueError, TypeError) as e:  # unknown keys (TRL), invalid values (__post_init__ of the configs)
        msg = " ".join(str(e).split())
        m = re.search(r"Some specified arguments are not used by the HfArgumentParser: \[(.*?)\]", msg)
        if m:  # unknown options on the command line (HfArgumentParser.parse_args_into_dataclasses), not the YAML's
            raise CTIQAError(f"command line: unknown argument(s) {m.group(1)} (see --help for the fields; "
                             "abbreviations are not accepted)") from None
        m = re.search(r"Unknown arguments from config file: \[(.*?)\]", msg)
        if m:
            keys = re.findall(r"'--([^']+)'", m.group(1))
            msg = f"unknown key{'s' if len(keys) > 1 else ''} {', '.join(keys)} (see --help for the fields)"
        raise CTIQAError(f"{where}: {msg}") from None
    if config is not None:
        _check_yaml_types(config, parsed)
    return parsed


def main_guard(main: Any, *args: Any) -> int:
    """Run ``main(*args)``; a :class:`ctiqa.CTIQAError` is printed as one ``error: ...`` line on stderr (the last
    line of the output) and gives exit status 2; :class:`AlreadyTrained` prints its line on stdout and gives 0.
    Anything else propagates with its traceback (a bug).

    Under ``accelerate launch`` the launcher adds its own traceback after a failed process; ``accelerate launch
    --quiet`` leaves the one line last.
    """
    try:
        main(*args)
    except AlreadyTrained as e:
        from accelerate import PartialState

        if PartialState().is_main_process:
            logging.shutdown()
            print(e, flush=True)
        return 0
    except CTIQAError as e:
        logging.shutdown()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------ launch checks
def setup_logging(training_args: Any) -> None:
    """Log to stdout at the Trainer's per-process level (``log_level`` / ``log_level_replica``): ctiqa, datasets
    and transformers alike."""
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    logging.getLogger("ctiqa").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def check_launch(model_args: Any, training_args: Any) -> None:
    """Refuse launches known to train nothing useful.

    - fp16 anywhere (``--fp16``, ``dtype: float16``, 4-bit compute or storage in fp16): Gemma 3's activations
      overflow fp16 (NaN loss, empty generations); bf16 or fp32 only (:data:`ctiqa.model_settings.TRAINING_DTYPES`).
    - DeepSpeed ZeRO-3: partitioning a bitsandbytes 4-bit base is not supported by the quantised layers (it needs
      ``zero3_init_flag`` off and reentrant checkpointing, and still fails on Gemma 3's tied embeddings); use DDP,
      ZeRO-2 or FSDP (recipes/accelerate_configs/).

    Raises:
        CTIQAError: naming the setting and the reason.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    dtypes = {"dtype": model_args.dtype, "bnb_4bit_quant_storage": model_args.bnb_4bit_quant_storage
              if model_args.load_in_4bit else None}
    if training_args.fp16 or getattr(training_args, "fp16_full_eval", False):
        raise CTIQAError("fp16 is not supported with Gemma 3 (its activations overflow fp16: NaN loss, empty "
                         "generations); use bf16: true on a GPU with bf16, else fp32 (bf16: false)")
    for key, value in dtypes.items():
        if value not in (None, "auto") and str(value).replace("torch.", "") not in TRAINING_DTYPES:
            raise CTIQAError(f"{key}: {value} is not supported with Gemma 3; use one of {', '.join(TRAINING_DTYPES)}")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage == "3" or is_deepspeed_zero3_enabled():
        raise CTIQAError("DeepSpeed ZeRO-3 is not supported: it cannot partition a bitsandbytes 4-bit base and is "
                         "untested with Gemma 3 here; use DDP, ZeRO-2 or FSDP (recipes/accelerate_configs/)")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: The numeric settings with an obvious valid range, checked by :func:`check_numbers` before anything is loaded:
#: (arguments, field, test, what is valid). "training": TrainingArguments (SFTConfig / GRPOConfig); "lora":
#: trl.ModelConfig, checked when ``use_peft``. Ranges from the optimizers and schedulers that use them
#: (torch AdamW: lr >= 0, eps >= 0, betas in [0, 1), weight decay >= 0; PEFT LoRA: r >= 1, dropout a probability;
#: transformers: warmup_steps < 1 is a ratio, >= 1 a number of steps; max_grad_norm 0 disables clipping; TRL's
#: GRPOConfig: beta the KL weight, num_generations >= 2, a sampling temperature > 0, top_p in (0, 1], epsilon the
#: clip of the policy ratio). A field the arguments do not have (GRPO's in an SFT run) is skipped.
NUMBER_RULES: tuple[tuple[str, str, Any, str], ...] = (
    ("training", "learning_rate", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("training", "warmup_steps", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (< 1: a ratio of the steps)"),
    ("training", "weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("training", "max_grad_norm", lambda v: v is None or (_finite(v) or v == math.inf) and v >= 0,
     "a number >= 0 (0 disables clipping)"),
    ("training", "adam_beta1", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("training", "adam_beta2", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("training", "adam_epsilon", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("training", "max_steps", lambda v: isinstance(v, int) and (v == -1 or v >= 0),
     "-1 (train num_train_epochs) or a number of steps"),  # transformers reads any negative as -1, silently
    ("training", "per_device_train_batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("training", "per_device_eval_batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("training", "gradient_accumulation_steps", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    # GRPOConfig (TRL): the KL weight, the group size, sampling and the policy-ratio clip (absent from SFTConfig)
    ("training", "beta", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (the KL weight; 0: no KL term)"),
    ("training", "num_generations", lambda v: isinstance(v, int) and v >= 2,
     "an integer >= 2 (GRPO compares the completions of a group)"),
    ("training", "num_iterations", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("training", "max_completion_length", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1 (tokens)"),
    ("training", "temperature", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("training", "top_p", lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"),
    ("training", "top_k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: no top-k filtering)"),
    ("training", "min_p", lambda v: v is None or _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    ("training", "repetition_penalty", lambda v: _finite(v) and v > 0, "a finite number > 0 (1: none)"),
    ("training", "epsilon", lambda v: _finite(v) and v > 0, "a finite number > 0 (the ratio clip)"),
    ("training", "epsilon_high", lambda v: v is None or _finite(v) and v > 0, "a finite number > 0"),
    ("lora", "lora_r", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("lora", "lora_alpha", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("lora", "lora_dropout", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
)


def check_numbers(training_args: Any, model_args: Any) -> None:
    """Refuse, before anything is loaded or written, numeric settings outside their valid range
    (:data:`NUMBER_RULES`; LoRA's only when ``use_peft``) and a run length that trains nothing: ``max_steps`` 0
    (the Trainer would take one step and write DONE), or no ``max_steps`` (<= 0) with ``num_train_epochs`` not a
    finite number > 0 (0 trains nothing and writes a finished run of 0 steps).

    Raises:
        CTIQAError: naming the setting, its value and what is valid, e.g. "learning_rate -0.001: must be a finite
            number > 0".
    """
    objs = {"training": training_args, "lora": model_args if getattr(model_args, "use_peft", False) else None}
    for where, name, ok, valid in NUMBER_RULES:
        obj = objs[where]
        if obj is None or not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        if not ok(value):
            raise CTIQAError(f"{name} {value}: must be {valid}")
    if training_args.max_steps == 0:  # the Trainer takes one step and writes DONE: a finished run of nothing
        raise CTIQAError("--max_steps 0 would train nothing; give a positive number of steps, or -1 (the default) to "
                         "train for --num_train_epochs")
    epochs = training_args.num_train_epochs
    if training_args.max_steps < 0 and not (_finite(epochs) and epochs > 0):
        raise CTIQAError(f"--num_train_epochs {epochs} would train "
                         f"{'nothing' if _finite(epochs) and epochs <= 0 else 'for ever'}; give a finite number of "
                         "epochs > 0, or --max_steps N")


#: Keys of ``model_init_kwargs`` (passed to ``from_pretrained``) that would carry a Hub token.
TOKEN_KWARGS = ("token", "use_auth_token")


def check_no_secrets(training_args: Any) -> None:
    """Refuse, before anything is written, arguments that would carry a secret into ``output_dir``: the Trainer
    pickles the whole training arguments into ``training_args.bin`` there and in every checkpoint, in plain text.
    Secrets come from the environment (``HF_TOKEN``, ``hf auth login``) and are never written. The fields that can
    hold one: ``hub_token`` (TrainingArguments' only token field), a ``token`` / ``use_auth_token`` in
    ``model_init_kwargs``, and a password in a URL (GRPOConfig's ``vllm_server_base_url``). The message never
    repeats the value.

    Raises:
        CTIQAError: naming the field and where a token belongs.
    """
    from urllib.parse import urlsplit

    where = ("it would be saved in plain text in training_args.bin in output_dir and every checkpoint; set HF_TOKEN "
             "or run `hf auth login` instead")
    if getattr(training_args, "hub_token", None):
        raise CTIQAError(f"hub_token: a token is never taken from the command line or a recipe ({where})")
    kwargs = getattr(training_args, "model_init_kwargs", None)
    if isinstance(kwargs, dict) and any(kwargs.get(k) not in (None, False) for k in TOKEN_KWARGS):
        raise CTIQAError(f"model_init_kwargs: a token is never taken from the command line or a recipe ({where})")
    url = getattr(training_args, "vllm_server_base_url", None)
    if isinstance(url, str):
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            raise CTIQAError("vllm_server_base_url: holds a password; it would be saved in plain text in "
                             "training_args.bin in output_dir and every checkpoint: give the server's address only")


def evaluation_split(script_args: Any, training_args: Any) -> str | None:
    """The split evaluated during training, on which ``load_best_model_at_end`` selects the checkpoint:
    ``dataset_test_split`` (default ``validation``), or None when ``eval_strategy`` is ``no`` (nothing is evaluated;
    the Trainer refuses ``load_best_model_at_end`` then)."""
    return script_args.dataset_test_split if training_args.eval_strategy != "no" else None


def check_splits(script_args: Any, training_args: Any) -> None:
    """Refuse, before anything is loaded or written, a run that would read the held-out split
    (:data:`ctiqa.ldctiqa.TEST_SPLIT`, what ``ctiqa evaluate`` reports on): training on it
    (``dataset_train_split``), or evaluating on it during training (``dataset_test_split`` with an
    ``eval_strategy``), which selects the checkpoint on it with ``load_best_model_at_end``. Either would make the
    test metrics of the model an evaluation on data it was fitted or chosen on.

    Raises:
        CTIQAError: naming the argument and the split to use instead.
    """
    if script_args.dataset_train_split == TEST_SPLIT:
        raise CTIQAError(f"dataset_train_split {TEST_SPLIT}: the {TEST_SPLIT!r} split is held out for `ctiqa "
                         "evaluate`, which reports on it; training on it would make that evaluation meaningless. "
                         "Train on 'train' (the default)")
    if evaluation_split(script_args, training_args) == TEST_SPLIT:
        raise CTIQAError(f"dataset_test_split {TEST_SPLIT}: that argument names the split evaluated during training "
                         f"and used for model selection; the {TEST_SPLIT!r} split is held out for `ctiqa evaluate` "
                         "and never read in training. Use 'validation' (the default)")


# ------------------------------------------------------------------------------------------- run guard, resume
def run_config(script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    """What defines a run, for :func:`prepare_output_dir`: the data, the model and every hyperparameter that changes
    what is learned. Length and bookkeeping (epochs, max steps, saving, logging, evaluation, push) and the number of
    processes are left out, so a resume may extend training or move to other hardware.

    Returns:
        a JSON-serialisable dict (``str`` of anything else).
    """
    keys = {
        "script": ("dataset_name", "dataset_config", "dataset_revision", "dataset_train_split"),
        "model": ("model_name_or_path", "model_revision", "dtype", "use_peft", "lora_r", "lora_alpha",
                  "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_rslora", "use_dora",
                  "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                  "bnb_4bit_quant_storage"),
        "training": ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
                     "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "seed", "bf16",
                     "max_length", "completion_only_loss", "assistant_only_loss", "packing", "loss_type", "beta",
                     "num_generations", "temperature", "max_completion_length",
                     # QA round 13: these change what is learned too (a re-run changing them resumed silently)
                     "label_smoothing_factor", "neftune_noise_alpha", "adam_beta1", "adam_beta2", "adam_epsilon",
                     "mask_truncated_completions", "num_iterations", "epsilon", "epsilon_high", "top_p", "top_k",
                     "min_p", "repetition_penalty", "scale_rewards"),
    }
    out: dict[str, Any] = {}
    for obj, names in ((script_args, keys["script"]), (model_args, keys["model"]), (training_args, keys["training"])):
        for name in names:
            if hasattr(obj, name):
                v = getattr(obj, name)
                v = getattr(v, "value", v)  # enums
                out[name] = v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)
    out = resolved_paths(out)
    # the data's content: rebuilt at the same path with other rows is another run (a byte-identical rebuild is not)
    out["dataset_files"] = dataset_fingerprint(out.get("dataset_name"), out.get("dataset_config"))
    out["recipe"] = RECIPE_KINDS.get(type(training_args).__name__, type(training_args).__name__)
    return out


#: Settings of :func:`run_config` added after runs were first recorded: a recorded run without one is not compared
#: on it (it resumes as before). A ``dataset_files`` recorded in the older file-date form (no ``sha256:`` prefix,
#: :func:`ctiqa.model_settings.legacy_dataset_fingerprint`) is compared in that form: equal, the run is the same
#: (and its record is rewritten in the content form); different, it is refused as before the change.
NEWER_SETTINGS = ("dataset_files", "label_smoothing_factor", "neftune_noise_alpha", "adam_beta1", "adam_beta2",
                  "adam_epsilon", "mask_truncated_completions", "num_iterations", "epsilon", "epsilon_high", "top_p",
                  "top_k", "min_p", "repetition_penalty", "scale_rewards")
#: The recipe kind recorded in :func:`run_config` (``recipe``), by the class of its training arguments (a record
#: without it is told by its ``reward_funcs``: :func:`read_run_record`).
RECIPE_KINDS = {"SFTConfig": "sft", "GRPOConfig": "grpo"}
#: Settings of :func:`run_config` that may name local folders: recorded resolved, so that a re-run from another
#: folder (where the same relative spelling names other data) or another spelling of the same folder is judged
#: by the folder itself.
PATH_SETTINGS = ("dataset_name", "model_name_or_path")


def resolved_paths(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its :data:`PATH_SETTINGS` that name local folders (:func:`ctiqa.paths.is_local_path`) made
    absolute and symlink-free (``os.path.realpath``); Hub ids unchanged. A config recorded by an older ctiqa with
    relative paths is resolved from the current folder."""
    out = dict(config)
    for k in PATH_SETTINGS:
        v = out.get(k)
        if isinstance(v, str) and is_local_path(v):
            out[k] = os.path.realpath(os.path.expanduser(v))
    return out


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
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


def is_training_output(folder: Path) -> bool:
    """True when ``folder`` was written by a ctiqa training run: its :data:`RUN_CONFIG_FILE` (written first), or
    (runs of older ctiqa) checkpoints, ``DONE`` or the trained settings file."""
    from ctiqa.model_settings import SETTINGS_FILE

    return any((folder / f).exists() for f in (RUN_CONFIG_FILE, DONE_FILE, SETTINGS_FILE)) or any(
        d.is_dir() for d in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))


def _steps_asked(max_steps: int | None, num_train_epochs: float | None,
                 state: dict[str, Any]) -> tuple[int | None, str]:
    """The total optimizer steps a run asks for, and how it asked: ``max_steps`` when > 0 (as the Trainer), else
    ``num_train_epochs`` x the steps per epoch of the recorded ``state`` (``global_step`` / ``epoch``; the same data
    and batch, which :func:`run_config` guarantees). None when neither is given or the state has no epoch."""
    if max_steps is not None and max_steps > 0:
        return max_steps, f"--max_steps {max_steps}"
    step, epoch = state.get("global_step") or 0, state.get("epoch") or 0
    if num_train_epochs is None or epoch <= 0:
        return None, ""
    asked = math.ceil(num_train_epochs * step / epoch - 1e-6)  # the Trainer's ceil(epochs x steps per epoch)
    return asked, f"--num_train_epochs {num_train_epochs:g} = {asked} steps"


def _check_length(root: Path, checkpoint: str | None, max_steps: int | None, num_train_epochs: float | None) -> None:
    """Refuse (or end as :class:`AlreadyTrained`) a re-run of the same run asking no more steps than it already
    holds: the Trainer would resume past the steps asked (it takes at least one step after a checkpoint) and the
    card would state the smaller number. The steps held: ``checkpoint``'s, or ``root``'s finished run's (``DONE`` and
    its ``trainer_state.json``) when more. As many as a checkpoint of a run that stopped before saving its model (no
    ``DONE``) is allowed: :func:`train` then saves the model from that checkpoint, training nothing."""
    finished = (root / DONE_FILE).exists()
    states = []
    if checkpoint is not None and (Path(checkpoint) / "trainer_state.json").is_file():
        states.append((json.loads((Path(checkpoint) / "trainer_state.json").read_text()), Path(checkpoint)))
    if finished and (root / "trainer_state.json").is_file():
        states.append((json.loads((root / "trainer_state.json").read_text()), None))
    if not states:
        return
    state, where = max(states, key=lambda s: s[0].get("global_step") or 0)
    done = state.get("global_step") or 0
    asked, how = _steps_asked(max_steps, num_train_epochs, state)
    if asked is None or asked > done:
        return  # more to train: a resume
    if asked == done and any(w is None and (s.get("global_step") or 0) == done for s, w in states):
        raise AlreadyTrained(f"{root} is already trained to {done} steps ({how}); nothing to do")
    if asked == done:
        return  # the run stopped after its last checkpoint, before saving its model: train() saves it from there
    if where is not None and where.resolve().parent != root.resolve():  # --resume_from_checkpoint of another folder
        raise CTIQAError(f"resume_from_checkpoint {where} holds this run trained to {done} steps; {how} asks for "
                         f"fewer, which it cannot undo; ask for more than {done} steps to continue it in {root}, or "
                         "leave out --resume_from_checkpoint to train this run from the start")
    raise CTIQAError(f"{root} holds this run trained to {done} steps ({where.name if where else 'its finished model'}); "
                     f"{how} asks for fewer, which it cannot undo; ask for more than {done} steps to continue it, or "
                     "choose another output_dir, or pass --overwrite_output_dir true to start over there")


def read_run_record(folder: str | Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The run recorded in ``folder``'s :data:`RUN_CONFIG_FILE`, in the form compared with ``config`` (a
    :func:`run_config`): local paths resolved, :data:`NEWER_SETTINGS` it lacks taken from ``config``, a dataset
    fingerprint of the older date form replaced by ``config``'s when the files are untouched, the recipe kind of a
    record written before it was recorded told by its rewards (GRPO). None when there is no record (or it is not a
    JSON object)."""
    path = Path(folder) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        return None
    if not isinstance(recorded, dict):
        return None
    recorded = resolved_paths(recorded)
    recorded.update({k: config[k] for k in NEWER_SETTINGS if k not in recorded and k in config})
    if "recipe" not in recorded:  # recorded before the kind was: GRPO runs are those with rewards
        recorded["recipe"] = "grpo" if "reward_funcs" in recorded else "sft"
    old = recorded.get("dataset_files")
    if isinstance(old, str) and not old.startswith(DATASET_FINGERPRINT_PREFIX) and \
            old == legacy_dataset_fingerprint(recorded.get("dataset_name")):
        recorded["dataset_files"] = config.get("dataset_files")  # older form, files untouched: the same data
    return recorded


def run_differences(recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """What differs between a recorded run and ``config`` (both :func:`run_config` forms), one phrase per setting
    (``learning_rate 0.001 -> 0.002``); another recipe kind (SFT / GRPO) is one phrase with the number of other
    settings that differ. Empty: the same run."""
    keys = [k for k in sorted(set(recorded) | set(config)) if recorded.get(k) != config.get(k)]
    if "recipe" in keys:
        n = len(keys) - 1
        return [f"recipe {recorded.get('recipe')!r} -> {config.get('recipe')!r}" +
                (f", and {n} other setting{'s' if n > 1 else ''}" if n else "")]
    return [f"{k} {recorded.get(k)!r} -> {config.get(k)!r}" if k != "dataset_files" else
            "dataset files: rebuilt with other content at the same path since" if
            str(recorded.get(k)).startswith(DATASET_FINGERPRINT_PREFIX) else
            "dataset files: rebuilt or changed at the same path since (the run was recorded by an older ctiqa "
            "by file dates, so a rebuild with the same rows counts too)" for k in keys]


def _has_weights(folder: Path) -> bool:
    return (folder / "adapter_model.safetensors").is_file() or any(folder.glob("model*.safetensors")) or any(
        folder.glob("pytorch_model*.bin"))


def check_resume_checkpoint(checkpoint: str, root: Path, config: dict[str, Any], *, overwrite: bool = False) -> str:
    """Check an explicit ``--resume_from_checkpoint`` before anything is loaded or written.

    It must be a complete Trainer checkpoint (a folder with ``trainer_state.json`` and model or adapter weights). One
    of ``output_dir`` (``root``) belongs to the run recorded there, which :func:`prepare_output_dir` compares. One of
    another folder is resumed only when it is a checkpoint of this same run: the :data:`RUN_CONFIG_FILE` of the
    folder that holds it equals ``config`` (dataset and its content, model, hyperparameters, recipe kind), exactly
    as a re-run into that folder would be judged. A checkpoint of another run would continue its weights and
    optimizer under this run's settings, and the card would credit this dataset with all its steps; one without a
    record cannot be told apart from another run, so it is refused too (a full model checkpoint can start a *new*
    run as ``--model_name_or_path``).

    Returns:
        ``checkpoint`` (as given).
    Raises:
        CTIQAError: no such folder; not a complete checkpoint; no weights; a checkpoint of another run (the
            differences named) or of no recorded run; one of ``output_dir`` with ``--overwrite_output_dir``
            (which deletes it).
    """
    path = Path(checkpoint).expanduser()
    name = f"resume_from_checkpoint {checkpoint}"
    if not path.is_dir():
        raise CTIQAError(f"{name}: no such folder (a re-run of the same command resumes from the last complete "
                         "checkpoint of output_dir by itself: leave --resume_from_checkpoint out)")
    if not (path / "trainer_state.json").is_file():
        raise CTIQAError(f"{name}: not a complete training checkpoint (no trainer_state.json: not a checkpoint-N "
                         "folder written by the Trainer, or one cut short by a kill)")
    if not _has_weights(path):
        raise CTIQAError(f"{name}: holds no model or adapter weights (model*.safetensors, "
                         "adapter_model.safetensors)")
    parent = path.resolve().parent
    if parent == root.resolve():
        if overwrite:
            raise CTIQAError(f"{name}: --overwrite_output_dir deletes the checkpoints of {root}, this one among "
                             "them; leave out one of the two")
        return checkpoint
    recorded = read_run_record(parent, config)
    full = _is_full_checkpoint(str(path))
    new_run = (f"; to start a new run from its weights give it as --model_name_or_path {checkpoint}"
               if full else "")
    if recorded is None:
        raise CTIQAError(f"{name}: no {RUN_CONFIG_FILE} in {parent}: cannot tell which run it belongs to, and only "
                         f"a checkpoint of this same run is resumed{new_run}")
    diffs = run_differences(recorded, config)
    if diffs:
        raise CTIQAError(f"{name} is a checkpoint of another run ({'; '.join(diffs)}): resuming it would continue "
                         f"that run's weights and optimizer under this run's settings; resume only a checkpoint of "
                         f"this same run{new_run}")
    return checkpoint


def prepare_output_dir(output_dir: str | Path, config: dict[str, Any], *, overwrite: bool = False,
                       resume_from_checkpoint: str | None = None, max_steps: int | None = None,
                       num_train_epochs: float | None = None) -> str | None:
    """Guard ``output_dir`` against mixing two runs, record this run, and find the checkpoint to resume from.

    - ``output_dir`` holds a run (checkpoints or ``DONE``) whose :data:`RUN_CONFIG_FILE` differs from ``config``:
      refused, naming each differing setting (old -> new), unless ``overwrite``; then its checkpoints and ``DONE``
      are deleted (logged) and training starts over. A record without checkpoints (a run that failed before its
      first one) is simply replaced.
    - It holds checkpoints but no run config (written by an older ctiqa): refused unless ``overwrite`` (it cannot
      be told apart from another run).
    - Same run: resumes from :func:`last_complete_checkpoint` when the steps asked (``max_steps``, or
      ``num_train_epochs`` x steps per epoch) are more than it (or the finished run) holds. Exactly as many, finished
      (``DONE``): :class:`AlreadyTrained`, nothing touched. Exactly as many in a checkpoint of a run killed before
      it saved its model (no ``DONE``): that checkpoint is returned and :func:`train` saves the model from it,
      training nothing. Fewer: refused with the steps held and asked, unless ``overwrite``. ``max_steps`` and epochs
      are not part of ``config`` so a run can be extended (its ``DONE`` is removed until the extension saves).
    - An explicit ``resume_from_checkpoint`` is checked by :func:`check_resume_checkpoint`: a complete checkpoint,
      and, outside ``output_dir``, one of this same run (its folder's record equals ``config``).
    - A non-empty folder that no ctiqa training wrote (:func:`is_training_output`: a dataset folder, someone's
      README.md), or the run's own local dataset or model folder: refused before anything is written
      (:func:`ctiqa.paths.check_output_path`); the card would replace its README.md. An ``output_dir`` inside a
      dataset folder (the run's local dataset, or any ``ctiqa build-dataset`` folder) is refused too
      (:func:`ctiqa.paths.check_outside_dataset`). An ``output_dir`` that is a link to nothing is followed: its
      target is created.

    Every process reads the folder first, the main process then writes (all wait for each other), so multi-process
    launches agree on the checkpoint.

    Args:
        config: :func:`run_config` of this run. resume_from_checkpoint: an explicit ``--resume_from_checkpoint``
            (returned as is once :func:`check_resume_checkpoint` accepts it; the guard still applies). max_steps, num_train_epochs: the length asked (the
            TrainingArguments fields of the same names; both None: not checked).
    Returns:
        the checkpoint folder to resume from, or None to start from the model.
    Raises:
        CTIQAError: another run in ``output_dir``; fewer steps asked than it holds; a folder or input that is not
            ours (above); a ``resume_from_checkpoint`` that is missing, incomplete or of another run.
        AlreadyTrained: the same run, finished, with as many steps as asked.
    """
    from accelerate import PartialState

    inputs = [config.get(k) for k in ("dataset_name", "model_name_or_path")
              if isinstance(config.get(k), str) and is_local_path(config[k])]
    # inside a dataset folder, the run's files would join the dataset (and its Hub upload)
    check_outside_dataset(output_dir, config.get("dataset_name"), what="output_dir")
    root = check_output_path(output_dir, what="output_dir", folder=True, ours=is_training_output, inputs=inputs,
                             hint="Give a new or empty output_dir (training writes its model, checkpoints, README.md "
                                  f"card and {RUN_CONFIG_FILE} there)")
    state = PartialState()
    recorded_file = root / RUN_CONFIG_FILE
    recorded = read_run_record(root, config)
    checkpoints = sorted(root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")) if root.is_dir() else []
    trained = bool(checkpoints) or (root / DONE_FILE).exists()  # a run that stopped before its first checkpoint
    if recorded is not None and recorded != config and trained:  # left nothing to mix with: it is overwritten
        if not overwrite:
            raise CTIQAError(f"{root} holds another run ({'; '.join(run_differences(recorded, config))}); choose "
                             "another output_dir, or pass --overwrite_output_dir true to start over there")
    elif recorded is None and checkpoints and not overwrite:
        raise CTIQAError(f"{root} holds checkpoints without {RUN_CONFIG_FILE} (an older or foreign run): cannot "
                         "tell whether it is this run; choose another output_dir, or pass --overwrite_output_dir "
                         "true to start over there")
    checkpoint = resume_from_checkpoint
    if checkpoint is not None:
        checkpoint = check_resume_checkpoint(checkpoint, root, config, overwrite=overwrite)
    elif not overwrite:
        checkpoint = last_complete_checkpoint(root)
    if not overwrite:  # the same run (another one was refused above, or left nothing)
        _check_length(root, checkpoint, max_steps, num_train_epochs)
    state.wait_for_everyone()
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if overwrite and (checkpoints or (root / DONE_FILE).exists()):
            for d in checkpoints:
                shutil.rmtree(d)
            (root / DONE_FILE).unlink(missing_ok=True)
            logger.warning("--overwrite_output_dir: deleted %d checkpoint(s) and the DONE marker of the previous "
                           "run in %s; starting over", len(checkpoints), root)
        elif checkpoint is not None and (root / DONE_FILE).exists():  # a finished run extended: DONE marks the
            (root / DONE_FILE).unlink()  # model of its last session until this one saves its own
            logger.info("extending the finished run in %s: its DONE marker is removed until this session saves", root)
        recorded_file.write_text(json.dumps(config, indent=2) + "\n")
    state.wait_for_everyone()
    if checkpoint is not None:
        logger.info("checkpoint detected, resuming training at %s", checkpoint)
    return checkpoint


# ------------------------------------------------------------------------------------------------------- data
def load_recipe_dataset(script_args: Any, columns: tuple[str, ...] = ("prompt", "completion", "images")):
    """The dataset of a recipe (Hub id or folder written by ``ctiqa build-dataset``), with its train and test
    splits and the columns the recipe needs checked.

    Returns:
        ``datasets.DatasetDict``.
    Raises:
        CTIQAError: no dataset given; a local folder that does not exist (for the demo's ``runs/demo/dataset``,
            how to make it) or holds no data files; a Hub id that cannot be reached (offline, network), does not
            exist or is not accessible; a missing split or column.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    name = script_args.dataset_name
    if not name:
        raise CTIQAError("no dataset: pass --dataset_name (Hub id or folder written by `ctiqa build-dataset`)")
    if is_local_path(name) and not Path(name).expanduser().is_dir():
        hint = DEMO_DATASET_HINT if Path(name).as_posix().rstrip("/").endswith(DEMO_DATASET.as_posix()) else \
            f"make it with `ctiqa build-dataset ... --out {name}`"
        raise CTIQAError(f"dataset {name}: no such folder; {hint}")
    check_dataset_finished(name)
    try:
        dataset = load_dataset(name, name=script_args.dataset_config, revision=script_args.dataset_revision)
    except ConnectionError as e:  # datasets: "Couldn't reach 'x' on the Hub (OfflineModeIsEnabled)", not cached
        offline = "OfflineModeIsEnabled" in str(e) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true")
        why = ("offline (HF_HUB_OFFLINE is set) and not in the local datasets cache; download it once online, or "
               "give a local folder") if offline else f"cannot reach the Hugging Face Hub ({e}); check the network"
        raise CTIQAError(f"dataset {name}: {why}") from None
    except DatasetNotFoundError as e:  # not on the Hub, private or gated (no access with this token)
        raise CTIQAError(f"dataset {name}: not found on the Hub, or no access ({' '.join(str(e).split())}); check "
                         "the id, and for a private or gated dataset log in (`hf auth login` or HF_TOKEN) with an "
                         "account that has access") from None
    except FileNotFoundError as e:  # a local folder with no data files, a missing config
        raise CTIQAError(f"dataset {name}: {' '.join(str(e).split())}") from None
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split not in dataset:
            raise CTIQAError(f"dataset {name}: no split {split!r} (has {', '.join(dataset)})")
    missing = set(columns) - set(dataset[script_args.dataset_train_split].column_names)
    if missing:
        raise CTIQAError(f"dataset {name}: missing columns {', '.join(sorted(missing))} (expected the output of "
                         "`ctiqa build-dataset`)")
    return dataset


def check_examples_fit(dataset: Any, processor: Any, max_length: int | None, split: str,
                       batch_size: int = 16) -> dict[str, int]:
    """Collate every example exactly as SFT training will (TRL's vision collator, completion-only loss, no
    truncation) and check that it trains on what it should.

    Checks per example: the sequence fits ``max_length`` whole (no image block cut, no target truncated), it holds
    exactly one BOS, the supervised tokens hold no image token and spell the completion text (so the score is
    inside the loss), ``Score: `` appears there, and the target's text holds none of the tokenizer's special tokens
    (``<end_of_turn>`` written in a rationale becomes the stop token inside the target).

    Returns:
        ``{"n": examples, "max_tokens": longest sequence, "max_target_tokens": longest supervised part}``.
    Raises:
        CTIQAError: naming the split and the offending example ids with what is wrong.
    """
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

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
            real = batch["attention_mask"][k] == 1
            n = int(real.sum())
            supervised = batch["input_ids"][k][batch["labels"][k] != -100]
            text = tok.decode(supervised, skip_special_tokens=False)
            longest, longest_target = max(longest, n), max(longest_target, len(supervised))
            n_bos = int((batch["input_ids"][k][real] == tok.bos_token_id).sum())
            if max_length is not None and n > max_length:
                problems.append(f"{ex_id}: {n} tokens > max_length {max_length}")
            if n_bos != 1:
                problems.append(f"{ex_id}: {n_bos} BOS tokens (want exactly 1)")
            if image_id is not None and bool((supervised == image_id).any()):
                problems.append(f"{ex_id}: image tokens inside the supervised tokens")
            if found := [t for t in tok.all_special_tokens if t in targets[k]]:  # Gemma's stop token in a target
                problems.append(f"{ex_id}: the target holds the tokenizer's special token(s) {found} as text")
            if not text.startswith(targets[k].strip()) or "Score: " not in text:
                problems.append(f"{ex_id}: supervised tokens {text[:60]!r} do not spell the target")
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else "")
        raise CTIQAError(f"split {split!r}: examples that would not train correctly: {shown}")
    return {"n": len(dataset), "max_tokens": longest, "max_target_tokens": longest_target}


# ------------------------------------------------------------------------------------------------------ model
def load_processor(model_args: Any, training_args: Any) -> Any:
    """``AutoProcessor`` of ``model_name_or_path`` at ``model_revision``.

    A LoRA adapter folder (``adapter_config.json``: the SFT output GRPO trains further) holds the processor it was
    trained with (``recipes/sft.py`` saves it there).

    Raises:
        CTIQAError: ``model_name_or_path`` is meant as a local folder that is missing or holds neither
            ``config.json`` nor ``adapter_config.json``.
    """
    from transformers import AutoProcessor

    name = model_args.model_name_or_path
    if not (Path(name).expanduser() / "adapter_config.json").is_file():
        check_source_folder(name, "model_name_or_path", "config.json")
    return AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                         trust_remote_code=training_args.trust_remote_code)


def _is_full_checkpoint(checkpoint: str | None) -> bool:
    return bool(checkpoint) and (Path(checkpoint) / "config.json").is_file() and any(
        Path(checkpoint).glob("model*.safetensors"))


def load_model(model_args: Any, training_args: Any, *, checkpoint: str | None = None) -> tuple[Any, Any]:
    """The model to train and its LoRA config (None for full fine-tuning).

    Quantisation from TRL's ``get_quantization_config`` (4-bit NF4 when ``load_in_4bit``: compute dtype = ``dtype``,
    storage ``bnb_4bit_quant_storage``); a k-bit model gets one full copy per process on its own GPU
    (``device_map={"": local process index}``, what TRL 0.x's ``get_kbit_device_map`` returned; TRL 1.x dropped the
    helper; ``"auto"`` would split one copy over all GPUs and break DDP), none under FSDP (it loads on the CPU and
    shards) or on the CPU. The LoRA config is TRL's ``get_peft_config`` of the recipe as written (the recipes name
    their ``lora_target_modules``; when a recipe leaves it unset, PEFT's per-model default applies and is logged).

    Args:
        checkpoint: the checkpoint to resume from. For full fine-tuning its weights are loaded here, through
            ``from_pretrained``, which converts the Hub key names the Trainer saved them under (see the module
            docstring); adapters are restored by the Trainer.
    Raises:
        CTIQAError: no model given; a resume checkpoint of the other kind (an adapter for a full fine-tune, or the
            reverse); a resume checkpoint whose weights do not all load (missing, unexpected or mismatched keys).
    """
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForImageTextToText

    if not model_args.model_name_or_path:
        raise CTIQAError("no model: pass --model_name_or_path (Hub id or local folder)")
    if checkpoint is not None:  # the kind of weights it holds, before anything loads (else a Trainer traceback)
        has_adapter = (Path(checkpoint) / "adapter_model.safetensors").is_file()
        if model_args.use_peft and not has_adapter:
            raise CTIQAError(f"resume_from_checkpoint {checkpoint}: holds no LoRA adapter (adapter_model.safetensors) "
                             "and this run trains one (use_peft true)")
        if not model_args.use_peft and not _is_full_checkpoint(checkpoint):
            raise CTIQAError(f"resume_from_checkpoint {checkpoint}: holds no full model (config.json and "
                             f"model*.safetensors){', only a LoRA adapter' if has_adapter else ''}, and this run "
                             "fine-tunes the full model (use_peft false)")
    quantization_config = trl.get_quantization_config(model_args)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    device_map = None
    if quantization_config is not None and torch.cuda.is_available() and not fsdp:
        device_map = {"": PartialState().local_process_index}
    source = model_args.model_name_or_path
    resume_full = not model_args.use_peft and _is_full_checkpoint(checkpoint)
    kwargs = dict(trust_remote_code=training_args.trust_remote_code,
                  attn_implementation=model_args.attn_implementation, dtype=model_args.dtype,
                  quantization_config=quantization_config, device_map=device_map)
    if resume_full:
        model, info = AutoModelForImageTextToText.from_pretrained(checkpoint, output_loading_info=True, **kwargs)
        bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
        if bad or info.get("error_msgs"):
            detail = "; ".join(f"{len(v)} {k.replace('_', ' ')} (first: {sorted(map(str, v))[0]})"
                               for k, v in bad.items())
            raise CTIQAError(f"cannot resume from {checkpoint}: not every weight loads ({detail or info['error_msgs']})")
        logger.warning("resume: all weights of %s loaded through from_pretrained (%d tensors, verified); the "
                       "Trainer's own reload that follows matches none of the Hub key names (transformers#43701) and "
                       "changes nothing", checkpoint, len(model.state_dict()))
    else:
        model = AutoModelForImageTextToText.from_pretrained(source, revision=model_args.model_revision, **kwargs)
    model.config.use_cache = not training_args.activation_checkpointing
    if not model_args.use_peft:
        HideTrainerReloadWarning.install()
        return model, None
    if model_args.lora_target_modules is None:
        logger.warning("lora_target_modules not set: PEFT's default modules for %s apply", model.config.model_type)
    return model, trl.get_peft_config(model_args)


class HideTrainerReloadWarning(logging.Filter):
    """On the ``transformers.trainer`` logger: replaces the Trainer's "There were missing keys / unexpected keys in
    the checkpoint model loaded" warnings (~70 keys each on every full fine-tuning resume or best-model reload, its
    non-strict reload matching none of Gemma 3's Hub key names, transformers#43701) by one line saying why that is
    expected. Installed by :func:`load_model` for full fine-tuning only, where ctiqa loads every checkpoint itself
    through ``from_pretrained`` and fails unless every weight loads (:func:`load_model`, :func:`reload_best_model`).
    """

    PREFIXES = ("There were missing keys in the checkpoint model loaded",
                "There were unexpected keys in the checkpoint model loaded")

    def __init__(self) -> None:
        super().__init__()
        self.noted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.PREFIXES):
            return True
        if not self.noted:
            self.noted = True
            logger.warning("the Trainer's own checkpoint reload matched none of Gemma 3's key names "
                           "(transformers#43701; its 'missing keys' / 'unexpected keys' list is not shown): expected. "
                           "ctiqa loads the checkpoint's weights itself through from_pretrained and stops unless "
                           "every one loads")
        return False

    @classmethod
    def install(cls) -> None:
        """Add the filter to ``transformers.trainer`` once (a later run in the same process gets its note again)."""
        trainer_logger = logging.getLogger("transformers.trainer")
        for f in trainer_logger.filters:
            if isinstance(f, cls):
                f.noted = False
                return
        trainer_logger.addFilter(cls())


def reload_best_model(trainer: Any) -> None:
    """After training with ``load_best_model_at_end``, make a fully fine-tuned model hold the best checkpoint's
    weights. The Trainer's own best-model reload is the same non-strict ``load_state_dict`` as its resume and
    matches no Gemma 3 key (transformers#43701); here the checkpoint is loaded through ``from_pretrained`` and
    copied in strictly. Adapters are reloaded correctly by the Trainer (PEFT's own key layout): nothing to do.

    Raises:
        CTIQAError: the best checkpoint's weights do not all load.
    """
    from transformers import AutoModelForImageTextToText

    best = trainer.state.best_model_checkpoint
    args = trainer.args
    if not (best and args.load_best_model_at_end) or not _is_full_checkpoint(best) or hasattr(trainer.model,
                                                                                            "peft_config"):
        return
    best_model = AutoModelForImageTextToText.from_pretrained(best, dtype=trainer.model.dtype)
    result = trainer.model.load_state_dict(best_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise CTIQAError(f"cannot reload the best checkpoint {best}: {result}")
    logger.warning("reloaded the best checkpoint %s (%s %s) through from_pretrained; every weight loaded",
                   best, args.metric_for_best_model, trainer.state.best_metric)


# -------------------------------------------------------------------------------------------------- callbacks
class StopOnNonFiniteLoss(TrainerCallback):
    """Stop training at the first step whose loss is NaN or infinite, naming the step.

    Two checks: after every optimizer step, the trainable parameters are finite (a NaN/inf loss gives NaN
    gradients and NaN weights in that same step, so this names the first bad step even between logging steps;
    one ``isfinite`` pass over the trainable weights, cheap next to the optimizer); and every logged ``loss`` /
    ``grad_norm`` is finite (set ``logging_nan_inf_filter: false``, as the recipes do, or the Trainer averages
    NaN losses away before logging).

    Raises:
        CTIQAError: "loss is not finite at step N ..." (from ``trainer.train``). Checkpoints saved before are kept.
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import torch

        if model is None:
            return
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]) if params else None
        if finite is not None and not bool(finite.all()):  # one device sync per step
            name = params[int((~finite).nonzero()[0])][0]
            raise CTIQAError(f"loss is not finite at step {state.global_step}: weights became NaN/inf "
                             f"(first: {name}); lower the learning rate or use fp32/bf16, and resume from the "
                             "last checkpoint")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise CTIQAError(f"loss is not finite at step {state.global_step}: {key} {value}; lower the "
                                 "learning rate or use fp32/bf16, and resume from the last checkpoint")


class VerifyResumedWeights(TrainerCallback):
    """Before the first step of a resumed run, check that the trainable weights equal the checkpoint's, in the
    checkpoint's dtype.

    For an adapter: every tensor of ``adapter_model.safetensors`` equals the model's (``peft``'s
    ``get_peft_model_state_dict``, the state the Trainer saved), and none is missing. The Trainer reloads an adapter
    with PEFT's ``load_adapter``, which upcasts it to fp32, while TRL trains a QLoRA adapter in bf16 (QLoRA paper
    §3; ``SFTTrainer`` casts it): the resumed run would continue in another dtype than the run it resumes (and save
    a twice larger adapter). Weights and their optimizer state are cast back to the checkpoint's dtype here. A full
    model was loaded strictly by :func:`load_model`; its check is that loading.

    Raises:
        CTIQAError: a missing or different tensor (the resume would continue from other weights).
    """

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch
        from safetensors.torch import load_file

        path = Path(self.checkpoint) / "adapter_model.safetensors"
        if model is None or not path.is_file():
            return
        from peft import get_peft_model_state_dict

        saved = load_file(str(path))
        current = get_peft_model_state_dict(model)
        missing = sorted(set(saved) ^ set(current))
        different = [k for k in saved if k in current and not torch.equal(
            saved[k].to(current[k].device, current[k].dtype), current[k].detach())]
        if missing or different:
            raise CTIQAError(f"resume from {self.checkpoint}: adapter weights not restored ({len(missing)} missing, "
                             f"{len(different)} different; first: {(missing or different)[0]})")
        want = {saved[k].dtype for k in saved}
        if len(want) == 1:
            dtype = want.pop()
            opt_state = getattr(optimizer, "state", {}) if optimizer is not None else {}
            for p in model.parameters():
                if p.requires_grad and p.dtype != dtype and p.is_floating_point():
                    p.data = p.data.to(dtype)
                    for key, value in opt_state.get(p, {}).items():
                        if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0:
                            opt_state[p][key] = value.to(dtype)
        logger.info("resume: %d adapter tensors equal %s", len(saved), path)


#: Key of the entry :class:`LossLogAtCheckpoints` adds to ``trainer_state.json``'s ``log_history`` when a training
#: session starts: ``{"step": N, "ctiqa_session_start": N}`` (N = 0 for a fresh run, the checkpoint's step on resume).
SESSION_START_KEY = "ctiqa_session_start"


class LossLogAtCheckpoints(TrainerCallback):
    """Keep ``log_history`` complete enough to give the training loss of a whole run across resumptions.

    The Trainer logs ``loss`` every ``logging_steps`` as the mean over the steps since its last log; a checkpoint
    saved between two logs loses the losses of the steps since the last one when the run is killed after it, and a
    resumed run's ``train_loss`` covers only the resumed steps. So: a log is forced at every checkpoint save (the
    saved ``log_history`` then ends at the checkpoint's step), and each session records where it started
    (:data:`SESSION_START_KEY`), which :func:`run_training_loss` checks.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        state.log_history.append({SESSION_START_KEY: state.global_step, "step": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy "epoch"
            control.should_log = True


def run_training_loss(log_history: list[dict[str, Any]], start_step: int, global_step: int,
                      session_loss: float) -> float | None:
    """The mean training loss over all steps 1..``global_step`` of a run resumed at ``start_step``.

    Each logged ``loss`` is the mean over the optimizer steps since the previous log, so the sum over steps
    1..``start_step`` is sum(loss x steps it covers) over the log entries of the earlier sessions; the resumed
    steps add ``session_loss`` (the Trainer's ``train_loss`` of this session: the mean over its steps) x their
    number. Exact (up to float rounding) when the earlier log covers every step, which holds for sessions run with
    :class:`LossLogAtCheckpoints`: the history starts with a session start at step 0, and before every later
    session start the last logged loss is at that step.

    Args:
        log_history: ``trainer.state.log_history`` after training (this session's start entry included).
        start_step: the step this session resumed from (0: not resumed). global_step: the last step trained.
        session_loss: the Trainer's ``train_loss`` of this session.
    Returns:
        the mean loss, or ``session_loss`` when ``start_step`` is 0; None when the earlier steps' losses are not all
        in the log (a run begun before ctiqa recorded session starts, or logged without a checkpoint log).
    """
    if start_step <= 0:
        return session_loss
    marks = [i for i, h in enumerate(log_history) if h.get(SESSION_START_KEY) == start_step]
    earlier = log_history[:marks[-1]] if marks else []
    if not earlier or earlier[0].get(SESSION_START_KEY) != 0:
        return None
    total, last = 0.0, 0
    for h in earlier:
        if SESSION_START_KEY in h and h[SESSION_START_KEY] != last:
            return None  # a session began at a step whose losses since the previous log were lost
        if "loss" in h and isinstance(h.get("step"), int) and h["step"] > last:
            total += h["loss"] * (h["step"] - last)
            last = h["step"]
    if last != start_step:
        return None
    return (total + session_loss * (global_step - start_step)) / global_step


def without_generic_card(trainer: Any) -> Any:
    """Stop a TRL trainer writing its generic model card into ``output_dir`` at every checkpoint save (TRL's
    ``_save_checkpoint`` calls ``create_model_card``; its card names the base model "None" when it was loaded from
    an object). ctiqa writes the cards: :class:`UnfinishedRunCard` while training, :func:`save_outputs` at the end,
    so a kill at any moment leaves no false card. Returns ``trainer``."""
    trainer.create_model_card = lambda *args, **kwargs: None
    return trainer


class UnfinishedRunCard(TrainerCallback):
    """Replace the generic model card TRL writes into ``output_dir`` at every checkpoint save (its base model is
    "None" and its quick start loads ``model="None"``) with a short one saying what the folder holds: checkpoints of
    an unfinished run, no model yet, and how to finish it. ctiqa's own card replaces it when the run ends
    (:func:`save_outputs`); a run stopped before (kill, NaN, crash) leaves no false card."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.on_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not Path(args.output_dir, DONE_FILE).exists():
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with atomic_write(Path(args.output_dir) / "README.md", encoding="utf-8") as f:
                f.write(f"# Unfinished ctiqa training run\n\nThis folder holds checkpoints of a training run that "
                        f"has not finished (step {state.global_step} of {state.max_steps}): no model is saved here "
                        "yet. Run the same command again to resume it; the model, its model card and `DONE` are "
                        "written when it ends.\n\n**Not for clinical use.**\n")


def training_callbacks(checkpoint: str | None) -> list[TrainerCallback]:
    """The callbacks every ctiqa run uses: :class:`StopOnNonFiniteLoss`, :class:`LossLogAtCheckpoints`,
    :class:`UnfinishedRunCard`, and :class:`VerifyResumedWeights` when resuming."""
    return [StopOnNonFiniteLoss(), LossLogAtCheckpoints(), UnfinishedRunCard()] + (
        [VerifyResumedWeights(checkpoint)] if checkpoint else [])


# ------------------------------------------------------------------------------------------- settings, card, push
def start(script_args: Any, training_args: Any, model_args: Any) -> None:
    """The opening of every recipe: logging, one line per process (rank, device, world size, bf16), the arguments
    at info level, the launch checks (:func:`check_launch`: fp16 / ZeRO-3 refused) and the seed.

    Raises:
        CTIQAError: a launch that would train the wrong thing (see :func:`check_launch`); a secret in the arguments
            (see :func:`check_no_secrets`); a number out of its range or a run length of nothing (see
            :func:`check_numbers`); the held-out test split to train or select on (see :func:`check_splits`).
    """
    from transformers import set_seed

    setup_logging(training_args)
    logger.warning("process rank %s, device %s, world size %s, bf16 %s", training_args.process_index,
                   training_args.device, training_args.world_size, training_args.bf16)
    logger.info("script arguments %s\nmodel arguments %s", script_args, model_args)
    check_launch(model_args, training_args)
    check_no_secrets(training_args)
    check_numbers(training_args, model_args)
    check_splits(script_args, training_args)
    set_seed(training_args.seed)


@contextlib.contextmanager
def output_dir_lock(training_args: Any, what: str) -> Iterator[None]:
    """Hold the lock of ``output_dir`` for the ``with`` block, the run's whole life
    (:func:`ctiqa.paths.lock_output`: ``<output_dir>.lock`` beside the folder, symbolic links resolved, as
    ``ctiqa predict`` / ``build-dataset`` lock their ``--out``): a second launch into the same folder is refused
    before it writes anything, instead of writing checkpoints into the first one's.

    Only the main process of a launch (``training_args.process_index`` 0, the one that writes the run record,
    model and card) takes it, so the processes of one multi-process launch never refuse each other; it tells the
    others whether it got it (``accelerate.utils.broadcast_object_list``), so a refused launch is refused by every
    process with the same line, as any other refusal. The lock is released when the block ends, or by the system
    when the process exits (:func:`finish` leaves a multi-process run with ``os._exit``).

    Raises:
        CTIQAError: "output_dir X: another W run is writing it (locked by X.lock) ...", or the folder's parent
            cannot be written.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    lock, refused = None, None
    if training_args.process_index == 0:
        try:
            lock = lock_output(Path(os.path.realpath(os.path.expanduser(training_args.output_dir))), what,
                               option="output_dir")
        except CTIQAError as e:
            refused = e
    if PartialState().num_processes > 1:  # every process of the launch learns the main process's answer
        answer = [str(refused) if refused is not None else None]
        broadcast_object_list(answer, from_process=0)
        if refused is None and answer[0] is not None:
            refused = CTIQAError(answer[0])
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


#: The Trainer's figures that cover only the steps of the current session (the process that ran them): renamed
#: ``session_*`` by :func:`train` in a resumed run.
SESSION_METRICS = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
                   "train_wall_seconds")


def train(trainer: Any, checkpoint: str | None, n_samples: int) -> dict[str, Any]:
    """Train (resuming from ``checkpoint``), keep the best checkpoint's weights (:func:`reload_best_model`), log and
    save the metrics and the trainer state. Returns the metrics (as ``train_results.json``).

    Metrics: the Trainer's (``train_loss``, ``train_runtime`` in s, samples and steps per s, ``total_flos``,
    ``epoch``), ``train_samples`` (rows of the train split) and ``train_wall_seconds`` (s). A resumed run (from a
    checkpoint at step S) trains steps S+1..N in this process, and the Trainer's loss, runtime and speeds cover those
    only: they are kept as ``session_train_loss``, ``session_train_runtime``, ... with ``resumed_from_step`` S and
    ``global_step`` N, and ``train_loss`` is the mean over all N steps (:func:`run_training_loss`), left out (with a
    warning) when the earlier steps' losses are not all in the log. The run's total runtime is not known (a killed
    session's time is not recorded). A ``checkpoint`` that already holds every step asked (a run killed after its
    last checkpoint, before its model was saved: :func:`prepare_output_dir` lets only that through) is not trained
    from: :func:`finish_from_checkpoint`.
    """
    import time

    start = 0
    if checkpoint is not None and (Path(checkpoint) / "trainer_state.json").is_file():
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        start = saved.get("global_step") or 0
        asked, _ = _steps_asked(trainer.args.max_steps, trainer.args.num_train_epochs, saved)
        if asked is not None and start >= asked:  # killed after its last checkpoint, before the model was saved
            return finish_from_checkpoint(trainer, checkpoint, n_samples)
    logger.info("*** Train ***")
    t0 = time.perf_counter()
    metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    reload_best_model(trainer)
    metrics["train_samples"] = n_samples
    metrics["train_wall_seconds"] = round(time.perf_counter() - t0, 1)
    if start > 0:
        steps = trainer.state.global_step
        run_loss = run_training_loss(trainer.state.log_history, start, steps, metrics["train_loss"])
        metrics = {("session_" + k if k in SESSION_METRICS else k): v for k, v in metrics.items()}
        metrics.update(resumed_from_step=start, global_step=steps)
        if run_loss is not None:
            metrics["train_loss"] = run_loss
        else:
            logger.warning("resumed at step %d: the losses of steps 1-%d are not all in the log (a run begun by an "
                           "older ctiqa); only this session's mean loss (steps %d-%d) is recorded, as "
                           "session_train_loss", start, start, start + 1, steps)
    trainer.log_metrics("train", metrics)
    if trainer.is_world_process_zero():  # save_metrics merges into it: no figures of an earlier session kept there
        Path(trainer.args.output_dir, "all_results.json").unlink(missing_ok=True)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def finish_from_checkpoint(trainer: Any, checkpoint: str, n_samples: int) -> dict[str, Any]:
    """Finish a run killed after its last checkpoint (which holds every step asked) and before its model was saved:
    nothing is trained. The trainer takes the checkpoint's state (``trainer_state.json``: steps, log, best
    checkpoint) and its weights, verified as a resume verifies them: a full model was loaded from the checkpoint
    by :func:`load_model` (every weight, strictly) and the best checkpoint's replace them when
    ``load_best_model_at_end`` (:func:`reload_best_model`); an adapter is loaded from the checkpoint (the best one
    when ``load_best_model_at_end``, as the Trainer does at the end of training) and checked tensor by tensor
    (:class:`VerifyResumedWeights`). The metrics and state are saved as :func:`train` saves them; the caller then
    saves the model, card and ``DONE`` (:func:`save_outputs`).

    Returns:
        the metrics (``train_results.json``): ``train_loss`` (the mean over all steps, from the logged losses; left
        out when they do not cover every step), ``global_step``, ``epoch``, ``total_flos``, ``train_samples``,
        ``saved_from_checkpoint`` (the step of the checkpoint the model was saved from).
    Raises:
        CTIQAError: an adapter tensor missing or different after the load.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    trainer.state = state
    steps = state.global_step
    logger.warning("%s already holds the %d steps asked: the run stopped after it, before saving its model; saving "
                   "the model from it (nothing is trained)", checkpoint, steps)
    if hasattr(trainer.model, "peft_config"):
        best = state.best_model_checkpoint
        source = best if trainer.args.load_best_model_at_end and best and \
            (Path(best) / "adapter_model.safetensors").is_file() else checkpoint
        set_peft_model_state_dict(trainer.model, load_file(str(Path(source) / "adapter_model.safetensors")))
        VerifyResumedWeights(source).on_train_begin(trainer.args, state, trainer.control, model=trainer.model)
    else:
        reload_best_model(trainer)
    log = state.log_history + [{SESSION_START_KEY: steps, "step": steps}]
    loss = run_training_loss(log, steps, steps, 0.0)
    metrics = {"global_step": steps, "epoch": state.epoch, "total_flos": state.total_flos,
               "train_samples": n_samples, "saved_from_checkpoint": steps}
    if loss is not None:
        metrics["train_loss"] = loss
    else:
        logger.warning("the losses of steps 1-%d are not all in the log of %s: no mean training loss is recorded",
                       steps, checkpoint)
    trainer.log_metrics("train", metrics)
    if trainer.is_world_process_zero():
        Path(trainer.args.output_dir, "all_results.json").unlink(missing_ok=True)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def data_settings(script_args: Any, train_dataset: Any) -> dict[str, str | None]:
    """The data's part of :func:`trained_settings`: the render encoding recorded with the dataset
    (:func:`ctiqa.model_settings.dataset_encoding`) and the answer format and prompt version of its rows."""
    from ctiqa.model_settings import dataset_encoding

    first = train_dataset[0]
    return {"encoding": dataset_encoding(script_args.dataset_name, script_args.dataset_revision),
            "target_format": first.get("target_format"), "prompt_version": first.get("prompt_version")}


def trained_settings(model_args: Any, training_args: Any, *, adapter: bool, encoding: str | None,
                     target_format: str | None, prompt_version: str | None) -> TrainedSettings:
    """What :mod:`ctiqa.model_settings` records beside the output: quantisation, compute and storage dtypes, render
    encoding, answer format, prompt version."""
    dtype = str(model_args.dtype).replace("torch.", "") if model_args.dtype not in (None, "auto") else None
    q4 = bool(model_args.load_in_4bit)
    return TrainedSettings(
        base_model=model_args.model_name_or_path, adapter=adapter, load_in_4bit=q4,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type if q4 else None,
        bnb_4bit_use_double_quant=bool(model_args.use_bnb_nested_quant) if q4 else None,
        compute_dtype=dtype, dtype=dtype,
        # unset: transformers' BitsAndBytesConfig packs in uint8 (its documented default); str(None) was recorded
        storage_dtype=(str(model_args.bnb_4bit_quant_storage).replace("torch.", "")
                       if model_args.bnb_4bit_quant_storage is not None else BNB_DEFAULT_STORAGE) if q4 else None,
        bf16=bool(training_args.bf16), encoding=encoding, target_format=target_format,
        prompt_version=prompt_version, ctiqa_version=ctiqa.__version__)


def card_evaluation(output_dir: str | Path, eval_results: str | None) -> dict[str, Any] | None:
    """The evaluation a run's card shows: ``eval_results`` (a ``ctiqa evaluate`` ``results.json``), default
    ``output_dir/results.json`` when present, only when it evaluated exactly the weights now in ``output_dir``
    (:func:`ctiqa.evaluation.not_an_evaluation_of`); otherwise None, with a warning naming the file and why (also
    for a file given that is missing or not a ``results.json``: the card is written at the end of training, where
    an error would leave the run unfinished).
    """
    from ctiqa.evaluation import RESULTS_FILE, not_an_evaluation_of

    results = Path(eval_results or os.path.join(output_dir, RESULTS_FILE))
    if not results.is_file():
        if eval_results:
            logger.warning("%s is left out of the model card: no such file", results)
        return None
    try:
        evaluation = json.loads(results.read_text())
    except ValueError as e:
        evaluation = f"not a JSON file ({e})"
    if not isinstance(evaluation, dict):
        logger.warning("%s is left out of the model card: %s", results,
                       evaluation if isinstance(evaluation, str) else "not the results.json of `ctiqa evaluate`")
        return None
    why = not_an_evaluation_of(evaluation, output_dir) if evaluation is not None else None
    if why:  # a card never presents another model's, a predictions file's or earlier weights' metrics as these
        logger.warning("%s is left out of the model card: %s", results, why)
        evaluation = None
    return evaluation


def save_outputs(trainer: Any, *, settings: TrainedSettings, dataset_name: str | None, model_args: Any,
                 eval_results: str | None, metrics: dict[str, Any], **card_kwargs: Any) -> None:
    """Save what a finished run leaves in ``output_dir``: the model or adapter + processor (all processes take part:
    FSDP gathers), then on the main process the settings file, the model card (``README.md``, its "steps trained"
    the Trainer's ``global_step``) and ``DONE``. ``card_kwargs`` go to :func:`ctiqa.cards.model_card` (``stage``,
    ``extra_settings``)."""
    from ctiqa.cards import model_card
    from ctiqa.model_settings import SETTINGS_FILE

    out = trainer.args.output_dir
    if trainer.is_fsdp_enabled:  # gather the sharded adapter into one file (PEFT + FSDP docs)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(out)
    if not trainer.accelerator.is_main_process:
        return
    write_settings(out, settings)
    evaluation = card_evaluation(out, eval_results)
    # the steps trained (a resumed run's total, not the max_steps asked), and which step's weights are kept
    steps, best = trainer.state.global_step, trainer.state.best_global_step
    kept = f" (weights of the best checkpoint, step {best})" if trainer.args.load_best_model_at_end and best and \
        best != steps else ""
    card_kwargs["extra_settings"] = {"steps trained": f"{steps}{kept}", **(card_kwargs.get("extra_settings") or {})}
    card = model_card(base_model=model_args.model_name_or_path, dataset=dataset_name, training_args=trainer.args,
                      model_args=model_args, adapter=bool(settings.adapter), encoding=settings.encoding,
                      target_format=settings.target_format, eval_results=evaluation,
                      train_metrics=metrics, **card_kwargs)
    card.save(os.path.join(out, "README.md"))
    Path(out, DONE_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("model, %s and card saved to %s", SETTINGS_FILE, out)


def warn_large_adapter_modules(output_dir: str | Path) -> int:
    """Warn when an adapter saves whole ``lm_head`` / ``embed_tokens`` matrices (``lora_modules_to_save``, trainable
    tokens): with Gemma 3's 262k vocabulary that is ~2.7 GB per matrix in bf16 for MedGemma-4B.

    Returns:
        bytes of those tensors in ``adapter_model.safetensors`` (0 when none or no adapter).
    """
    from safetensors import safe_open

    path = Path(output_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return 0
    big = 0
    names = []
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if "lm_head" in key or "embed_tokens" in key:
                sl = f.get_slice(key)
                n = math.prod(sl.get_shape())
                big += n * {"F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 4)
                names.append(key)
    if big:
        logger.warning("the adapter saves full %s matrices: %.1f MB of its %.1f MB (lora_modules_to_save); the "
                       "push uploads them", ", ".join(sorted({n.split('.')[-2] for n in names})), big / 1e6,
                       path.stat().st_size / 1e6)
    return big


def push_output(training_args: Any, *, adapter: bool, commit_message: str) -> str:
    """Upload ``output_dir`` (top-level files: model or adapter, processor, settings, card; no checkpoints, logs or
    ``DONE``; for an adapter never base weights) once, at the end, to ``hub_model_id`` (default: the folder's name
    under the token's user), private unless ``hub_private_repo`` is false. The token comes from ``HF_TOKEN`` /
    ``hf auth login``, never from the recipe.

    Returns:
        the repo URL.
    """
    from huggingface_hub import HfApi

    out = training_args.output_dir
    if adapter:
        warn_large_adapter_modules(out)
    repo_id = training_args.hub_model_id or Path(out).name
    api = HfApi()
    private = training_args.hub_private_repo is not False
    ignore = ["checkpoint-*", "checkpoint-*/**", "runs/**", DONE_FILE, "training_args.bin", RUN_CONFIG_FILE]
    if adapter:
        ignore += ["model*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json"]
    with hub_push(repo_id):  # a failure is one line; the same command again pushes the finished run (end_trained_run)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_url.repo_id, folder_path=out, ignore_patterns=ignore,
                          commit_message=commit_message)
    logger.info("pushed to %s (private=%s)", repo_url, private)
    return str(repo_url)


def end_trained_run(done: AlreadyTrained, training_args: Any, *, commit_message: str,
                    eval_results: str | None = None) -> typing.NoReturn:
    """End a re-run of a finished run that asks for no more steps (``done`` from :func:`prepare_output_dir`): nothing
    is trained. When an evaluation of exactly the saved weights is given (``eval_results``) or lies in
    ``output_dir/results.json`` (:func:`card_evaluation`), the card's evaluation section is rewritten with it
    (:func:`ctiqa.cards.with_evaluation`; nothing else changes). When ``push_to_hub`` is asked the finished outputs
    are then pushed (:func:`push_output`), so a re-run is how a push that failed at the end of training (network,
    token) is retried.

    Raises:
        AlreadyTrained: always (``done``, with the card's refresh and the repo URL when pushed).
    """
    from accelerate import PartialState

    from ctiqa.cards import with_evaluation

    out = Path(training_args.output_dir)
    if PartialState().is_main_process and (out / "README.md").is_file():
        evaluation = card_evaluation(out, eval_results)
        card = (out / "README.md").read_text()
        if evaluation is not None and with_evaluation(card, evaluation) != card:
            (out / "README.md").write_text(with_evaluation(card, evaluation))
            done = AlreadyTrained(f"{done}; the card's evaluation section now shows "
                                  f"{eval_results or out / 'results.json'}")
    if training_args.push_to_hub and PartialState().is_main_process:
        adapter = (Path(training_args.output_dir) / "adapter_config.json").is_file()
        url = push_output(training_args, adapter=adapter, commit_message=commit_message)
        raise AlreadyTrained(f"{done}; pushed it to {url}") from None
    raise done


def finish(trainer: Any) -> None:
    """End the run. A multi-process run leaves with ``os._exit(0)`` once everything is saved and pushed: gloo's
    process-group destructor joins its worker threads while holding the GIL, and a worker still releasing its last
    all-gather's Python tensors waits for the GIL, a deadlock at interpreter exit
    (https://github.com/pytorch/pytorch/issues/56297; about 1 in 5 two-process CPU runs here, after "saved")."""
    multi_process = trainer.accelerator.num_processes > 1
    if hasattr(trainer, "end"):
        trainer.end()
    if multi_process:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
