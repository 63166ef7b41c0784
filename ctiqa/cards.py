"""The model card written (and pushed) by ``recipes/sft.py`` and ``recipes/grpo.py``: a ``huggingface_hub.ModelCard``.

Metadata follows the Hub's conventions for a MedGemma adapter: ``base_model`` (a Hub id), ``library_name: peft``
(``transformers`` for a fully trained model), ``pipeline_tag: image-text-to-text``, the base model's licence (MedGemma:
Health AI Developer Foundations terms), the dataset, tags. The text gives the recipe (every hyperparameter that
matters), a quick start, the intended use, "not for clinical use", and the evaluation table with 95 % intervals
when a ``ctiqa evaluate`` ``results.json`` is given. :func:`hub_push` is the one way every push (adapter, merged
model, dataset) reports a failure.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from ctiqa.paths import is_local_path

#: Licence of google/medgemma-4b-it (its model card): Health AI Developer Foundations terms of use.
HAI_DEF_LICENSE = {
    "license": "other",
    "license_name": "health-ai-developer-foundations",
    "license_link": "https://developers.google.com/health-ai-developer-foundations/terms",
}
METRIC_NAMES = ("srcc", "plcc", "krcc", "mae", "overall")


def _is_hub_id(name: str | None) -> bool:
    """True for a Hub id (``owner/name`` or ``name``): the one rule of :func:`ctiqa.paths.is_local_path`."""
    return bool(name) and not is_local_path(name)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4f}"
    return "n/a" if x is None else str(x)


def metric_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows ``(score kind, metric, value, 95 % interval)`` of a ``ctiqa evaluate`` ``results.json``.

    Reads ``results["metrics"][kind][metric]`` and its bootstrap interval ``[metric]_ci`` for the kinds the
    evaluation wrote (``parsed``: score parsed from the generated text, ``probability``: expected score from the
    digit-token probabilities) and the metrics in :data:`METRIC_NAMES`.
    """
    rows = []
    for kind, m in (results.get("metrics") or {}).items():
        for k in METRIC_NAMES:
            value, ci = m.get(k), m.get(f"{k}_ci")
            if isinstance(value, (int, float)):
                interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
                rows.append((kind, k.upper(), _fmt(float(value)), interval))
    return rows


def _train_line(metrics: dict[str, Any]) -> str:
    """The card's "Training run" line from ``train_results.json`` (:func:`ctiqa.training.train`). For a resumed run
    the figures of the whole run and those of the last session (``session_*``: the Trainer's loss, runtime and speeds
    cover only the steps that process trained) are stated apart, each with its steps."""
    nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    start, last = nums.pop("resumed_from_step", None), nums.pop("global_step", None)
    session = {k.removeprefix("session_"): nums.pop(k) for k in sorted(nums) if k.startswith("session_")}

    def figures(d: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in sorted(d.items()))

    if not start:
        return f"\nTraining run: {figures(nums)}.\n"
    loss = ("train_loss: the mean over all steps, from the losses logged in trainer_state.json" if "train_loss" in nums
            else "the mean loss over all steps is not known: the earlier steps' losses were not all logged")
    return (f"\nTraining run (steps 1-{last}, resumed from a checkpoint at step {start}): {figures(nums)} ({loss}). "
            f"This session only (steps {start + 1}-{last}): {figures(session)}.\n")


EVALUATION_HEADING = "## Evaluation"


def evaluation_section(eval_results: dict[str, Any] | None) -> str:
    """The text of the card's "Evaluation" section (under :data:`EVALUATION_HEADING`): the metrics table with 95 %
    intervals of a ``ctiqa evaluate`` ``results.json`` (and its faithfulness summary), or a line saying that no
    evaluation was attached."""
    rows = metric_rows(eval_results) if eval_results else []
    if rows:
        n = (eval_results.get("counts") or {}).get("n")
        where = f"split `{eval_results.get('split')}` of `{eval_results.get('dataset')}`"
        eval_md = ("| score | metric | value | 95 % interval |\n|---|---|---|---|\n"
                   + "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
                   + f"\n\n{n or '?'} images of {where}; `ctiqa evaluate` (results.json), percentile bootstrap "
                   "intervals. `parsed`: score parsed from the generated answer; `probability`: expected score from "
                   "the probabilities of the digit tokens after `Score: `.")
    else:
        eval_md = "No evaluation was attached to this run; use `ctiqa evaluate` on the held-out test split."
    fa = (eval_results or {}).get("faithfulness")
    if rows and fa and fa.get("n_measured"):
        pct = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"  # noqa: E731
        truth = fa.get("agreement_with_truth_rubric") or {}
        eval_md += (f"\n\n**Faithfulness of the rationales** to measured findings of each image (`ctiqa.findings`, "
                    f"no truth needed; {fa['n_measured']} rationales): noise addressed in {pct(fa['noise_addressed_rate'])}, "
                    f"its severity class agrees with the measured one in {pct(fa['noise_agreement_rate'])} (within one "
                    f"band {pct(fa['noise_within_one_band_rate'])}); streaks addressed in "
                    f"{pct(fa['streaks_addressed_rate'])}, agreeing with the measured call in "
                    f"{pct(fa['streak_agreement_rate'])} ("
                    + ("the streak call is validated on simulation only: bench/bench_findings.py --independent"
                       if fa.get("streak_call_validated") else
                       "the streak call is not validated, so streak claims are unverified")
                    + f"); artifacts the data cannot have (ring, motion, metal, beam hardening) claimed in "
                    f"{pct(fa['unverified_rate'])}."
                    + (f" The measured check gives the truth rubric's verdict on noise in "
                       f"{pct(truth.get('noise_agree_rate'))} and on streaks in {pct(truth.get('streaks_agree_rate'))}."
                       if truth else ""))
    return eval_md


def with_evaluation(card_text: str, eval_results: dict[str, Any]) -> str:
    """``card_text`` (a card written by :func:`model_card`) with its "Evaluation" section replaced by that of
    ``eval_results`` (:func:`evaluation_section`); unchanged when it has no such section.
    """
    head = f"\n{EVALUATION_HEADING}\n\n"
    start = card_text.find(head)
    if start < 0:
        return card_text
    start += len(head)
    end = card_text.find("\n\n## ", start)
    end = len(card_text.rstrip("\n")) if end < 0 else end
    return card_text[:start] + evaluation_section(eval_results) + card_text[end:]


def model_card(
    *,
    base_model: str,
    dataset: str | None,
    training_args: Any,
    model_args: Any,
    adapter: bool,
    eval_results: dict[str, Any] | None = None,
    train_metrics: dict[str, Any] | None = None,
    repo_id: str | None = None,
    encoding: str | None = None,
    stage: str = "sft",
    extra_settings: dict[str, Any] | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    target_format: str | None = None,
):
    """Build the model card of a ctiqa SFT run.

    Args:
        base_model: model id or folder trained from (``google/medgemma-4b-it``); put in the metadata when it is a
            Hub id, described in the text otherwise.
        dataset: dataset Hub id or folder.
        training_args: the run's ``trl.SFTConfig``; model_args: its ``trl.ModelConfig``.
        adapter: True when the output is a LoRA adapter (``library_name: peft``), False for a full model.
        eval_results: parsed ``results.json`` of ``ctiqa evaluate`` (optional): becomes the evaluation table.
        train_metrics: ``train_results.json`` content (:func:`ctiqa.training.train`: mean loss, runtime, ...;
            for a resumed run the whole run's and the last session's figures, stated apart), optional.
        repo_id: the Hub id the card will be pushed to (for the quick start); default ``training_args.hub_model_id``.
        encoding: render encoding of the training images (:data:`ctiqa.imaging.ENCODINGS`); the quick start renders
            with it (default: soft-tissue, the encoding of models trained before it was recorded).
        stage: ``sft`` (``recipes/sft.py``) or ``grpo`` (``recipes/grpo.py``, RL after SFT; ``training_args`` is
            then a ``trl.GRPOConfig``).
        extra_settings: more rows for the settings table (e.g. the GRPO rewards and their weights).
        train_split: the dataset split trained on (``dataset_train_split``); eval_split: the split evaluated during
            training, on which ``load_best_model_at_end`` selects the checkpoint (``dataset_test_split``; None when
            nothing was evaluated). Both are named in the card as the run used them (row "data splits", "model
            selection").
        target_format: the answer format trained (:data:`ctiqa.prompts.TARGET_FORMATS`; default score-first, the
            format of models trained before it was recorded): the card's description and quick-start prompt.
    Returns:
        ``huggingface_hub.ModelCard`` (``.save(path)`` writes README.md).
    """
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = repo_id or getattr(training_args, "hub_model_id", None) or "PATH/TO/THIS/FOLDER"
    encoding = encoding or "soft-tissue"
    target_format = target_format or "score-first"
    answers = {"score-first": "It answers `Score: <x.x>` first, then the reasoning.",
               "rationale-first": "It answers with the reasoning first, then `Score: <x.x>` on the last line.",
               "score-only": "It answers `Score: <x.x>` only, without reasoning."}.get(
        target_format, f"It answers in the `{target_format}` format.")
    medgemma = "medgemma" in (base_model or "").lower()
    data = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        datasets=[dataset] if _is_hub_id(dataset) else None,
        tags=["medical", "ct", "image-quality-assessment", "trl", "sft", "ctiqa"] + (["grpo"] if stage == "grpo" else []) + (["lora", "qlora"] if adapter else []),
        **(HAI_DEF_LICENSE if medgemma else {}),
    )
    hp = {
        "base model": base_model,
        "dataset": dataset,
        "method": ("QLoRA (4-bit NF4 base + LoRA)" if model_args.load_in_4bit else "LoRA") if adapter
        else "full fine-tuning",
        "LoRA r / alpha / dropout": f"{model_args.lora_r} / {model_args.lora_alpha} / {model_args.lora_dropout}"
        if adapter else None,
        "LoRA target modules": model_args.lora_target_modules if adapter else None,
        "modules_to_save": model_args.lora_modules_to_save if adapter else None,
        "4-bit quantisation": (f"{model_args.bnb_4bit_quant_type}, double quant {model_args.use_bnb_nested_quant}, "
                               f"compute {model_args.dtype}, storage {model_args.bnb_4bit_quant_storage}")
        if model_args.load_in_4bit else None,
        "dtype / bf16": f"{model_args.dtype} / {training_args.bf16}",
        "attention": model_args.attn_implementation,
        "learning rate": training_args.learning_rate,
        "schedule / warmup": f"{getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}"
                             f" / {training_args.warmup_steps}",
        "epochs / max steps": f"{training_args.num_train_epochs} / {training_args.max_steps}",
        "batch per device x accumulation x processes": (
            f"{training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps} x "
            f"{training_args.world_size}"),
        "max grad norm": training_args.max_grad_norm,
        "weight decay": training_args.weight_decay,
        "gradient checkpointing": training_args.activation_checkpointing,
        "max length": getattr(training_args, "max_length", None),
        "image encoding": f"`{encoding}` (ctiqa.imaging.render)",
        "loss": "completion only (target text + end of turn)" if stage == "sft" else None,
        "data splits": None if train_split is None else
        f"trained on `{train_split}`; " + (f"evaluated during training on `{eval_split}`" if eval_split else
                                            "nothing evaluated during training"),
        "model selection": (f"best {training_args.metric_for_best_model} on "
                            + (f"the `{eval_split}` split" if eval_split else "the evaluation split")
                            if training_args.load_best_model_at_end else "last step"),
        "seed": training_args.seed,
        **(extra_settings or {}),
    }
    hp_table = "\n".join(f"| {k} | {v} |" for k, v in hp.items() if v is not None)
    train_line = _train_line(train_metrics) if train_metrics else ""
    eval_md = evaluation_section(eval_results)
    if adapter:
        load = (f"model = AutoModelForImageTextToText.from_pretrained(\"{base_model}\", dtype=torch.bfloat16)\n"
                f"model = PeftModel.from_pretrained(model, \"{repo_id}\")\n"
                f"processor = AutoProcessor.from_pretrained(\"{repo_id}\")")
        imports = "import torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForImageTextToText, AutoProcessor"
        cli = f"ctiqa predict scan.dcm --model {base_model} --adapter {repo_id}"
    else:
        load = (f"model = AutoModelForImageTextToText.from_pretrained(\"{repo_id}\")\n"
                f"processor = AutoProcessor.from_pretrained(\"{repo_id}\")")
        imports = "from transformers import AutoModelForImageTextToText, AutoProcessor"
        cli = f"ctiqa predict scan.dcm --model {repo_id}"
    licence_md = ("Use is governed by the base model's licence: the [Health AI Developer Foundations terms of use]"
                  f"({HAI_DEF_LICENSE['license_link']}).") if medgemma else \
        f"Use is governed by the licence of the base model ({base_model})."
    recipe_md = ("Recipe: `recipes/sft.py` (TRL `SFTTrainer`), supervised on the assistant completion only."
                 if stage == "sft" else
                 "Recipe: `recipes/grpo.py` (TRL `GRPOTrainer`): reinforcement learning after SFT, rewards from "
                 "`ctiqa.rewards` (score accuracy, format, faithfulness of the rationale to the image's findings).")
    content = f"""---
{data.to_yaml()}
---

# CT image quality grader (ctiqa)

A vision-language model fine-tuned with ctiqa (`recipes/{stage}.py`) to rate the technical image quality of one
axial CT slice on the LDCTIQA 0-4 scale (0 bad, 1 poor, 2 fair, 3 good, 4 excellent) and explain the rating
(noise, streaks, edge sharpness, low-contrast detectability). {answers}

**Not for clinical use.** This is a research model: it has not been validated for diagnosis, patient management or
any clinical decision, and its explanations are learned from machine-written rationales that justify known scores.

## Quick start

```python
{imports}
from ctiqa.imaging import render
from ctiqa.prompts import prompt_messages

{load}
image = render("slice.dcm", "{encoding}")   # the RGB encoding the model was trained on
text = processor.apply_chat_template(prompt_messages("{target_format}"), add_generation_prompt=True, tokenize=False)
inputs = processor(text=text, images=[image], return_tensors="pt", add_special_tokens=False).to(model.device)
out = model.generate(**inputs, max_new_tokens=400, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

or from the command line: `{cli}` (it renders with `{encoding}`, recorded in `ctiqa_training.json`).

## Intended use

Research on automated, explainable CT image quality assessment: comparing reconstruction or dose settings,
screening image sets for quality problems, studying how well a VLM's ratings agree with radiologists'. Inputs are
single axial slices rendered with encoding `{encoding}` by `ctiqa.imaging.render`. Out of scope: clinical decisions,
other modalities, other body regions or windows than those trained on, artefacts absent from the training data.

## Training

{recipe_md}

| setting | value |
|---|---|
{hp_table}
{train_line}
{EVALUATION_HEADING}

{eval_md}

## Licence

{licence_md}
"""
    return ModelCard(content)


@contextlib.contextmanager
def hub_push(repo_id: str, kept: str = "the local output is kept") -> Iterator[None]:
    """Run a push to the Hub repo ``repo_id``; a failure to reach it or an HTTP error (offline mode, no network,
    401/403, quota) becomes one :class:`ctiqa.CTIQAError` line. What was written locally is kept, and every ctiqa
    command that pushes retries the push when run again (a finished build, training or export is not redone).

    Args:
        repo_id: the Hub repo. kept: what the message says survives (e.g. the answer cache when nothing local was
            written).
    Raises:
        CTIQAError: naming the repo and the failure (never the token).
    """
    import httpx2  # huggingface_hub 2's HTTP client (huggingface_hub/utils/_http.py): its connection errors
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from ctiqa import CTIQAError

    try:
        yield
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx2.TransportError, ConnectionError) as e:
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise CTIQAError(f"push to {repo_id} failed ({type(e).__name__}: {why}); {kept}: run "
                         "the same command again to retry the push") from e
