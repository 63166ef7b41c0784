"""Running a (fine-tuned) vision-language model on rendered CT images: generation and probability scores.

Used by ``ctiqa evaluate`` and ``ctiqa predict``; both hand over a list of RGB PIL images (the output of
:func:`ctiqa.imaging.render`) and get one :class:`ImagePrediction` per image::

    from ctiqa.inference import load_model, predict_images
    lm = load_model("google/medgemma-4b-it", adapter="runs/medgemma-qlora")     # or load_model("runs/demo/model")
    preds = predict_images(lm, images, fmt="score-first", generate=True, probability=True)
    preds[0].parsed_score, preds[0].prob_score, preds[0].prob_std, preds[0].text

The prompt is exactly the training prompt: :func:`ctiqa.prompts.prompt_messages` rendered by the processor's chat
template with ``add_generation_prompt=True`` (the template writes the BOS token, so the processor is called with
``add_special_tokens=False``: one BOS, as in training).

Probability score (Q-Align, Wu et al., ICML 2024; design.md §3): for the score-first and score-only formats the
answer starts ``Score: d.e``. One forward pass over ``prompt + "Score: "`` gives the distribution over the digit
tokens ``0``-``4`` at the score position; its key/value cache is then repeated for the four continuations
``"d."`` (d = 0..3) and a second, two-token pass gives the decimal distribution over ``0``-``9`` after each
(``4.`` can only be ``4.0`` on the 0-4 scale). Both distributions are renormalised over the allowed digit
tokens; the mass the model put on them before renormalising is recorded (``prob_mass``, ``prob_decimal_mass``):
a low mass means the model did not intend to write a digit there. The joint distribution over the 41 values
0.0, 0.1, ..., 4.0 gives the expected score (``prob_score``) and its standard deviation (``prob_std``).
Digits are single tokens in the Gemma 3 / MedGemma tokenizer (SentencePiece ``split_digits``) and in the tiny
model's; :func:`score_token_ids` checks this and raises otherwise.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError, CTIQAWarning
from ctiqa.imaging import check_model_image
from ctiqa.model_settings import (
    PRECISIONS,
    TrainedSettings,
    bnb_4bit_settings,
    inference_precision,
    read_settings,
)
from ctiqa.paths import check_source_folder
from ctiqa.prompts import DEFAULT_TARGET_FORMAT, TARGET_FORMATS, prompt_messages
from ctiqa.scale import SCORE_MAX
from ctiqa.scoring import parse_score_detailed

#: Formats whose answer starts with ``Score: `` and so have a probability score.
PROBABILITY_FORMATS = ("score-first", "score-only")
SCORE_PREFIX = "Score: "


@dataclass
class LoadedModel:
    """A model ready for :func:`predict_images`.

    Attributes:
        model: a ``transformers`` image-text-to-text model (optionally a ``peft.PeftModel``), in eval mode.
        processor: its processor (tokenizer + image processor + chat template).
        model_id: base model id or folder; adapter: adapter id or folder, or None.
        precision: "fp32", "bf16" or "4bit" (bitsandbytes 4-bit base); device: "cpu" / "cuda:0".
        compute_dtype: torch dtype name of the matmuls ("float32", "bfloat16"; for 4bit the bitsandbytes compute
            dtype). settings: what training recorded (:mod:`ctiqa.model_settings`), None when nothing was.
    """

    model: Any
    processor: Any
    model_id: str
    adapter: str | None
    precision: str
    device: str
    compute_dtype: str = "float32"
    settings: TrainedSettings | None = None
    _tokens: dict[str, Any] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        """Provenance for ``results.json``: model and adapter ids, precision and compute dtype, device, model class,
        and the training settings read beside the model (None when none were recorded)."""
        return {"model": self.model_id, "adapter": self.adapter, "precision": self.precision,
                "compute_dtype": self.compute_dtype, "device": self.device, "model_class": type(self.model).__name__,
                "trained_settings": self.settings.to_dict() if self.settings else None}


@dataclass
class ProbabilityScore:
    """Score read from token probabilities (see the module docstring).

    Attributes:
        score: expected score in [0, 4]; std: its standard deviation (score units).
        p_digits: renormalised probabilities of the integer part 0..4 (5 floats summing to 1).
        mass: probability the model put on the tokens ``0``-``4`` at the score position, in [0, 1].
        decimal_mass: the same for ``0``-``9`` at the decimal position, averaged over the integer part (weights
            ``p_digits``; the ``4.`` branch has no decimal).
    """

    score: float
    std: float
    p_digits: list[float]
    mass: float
    decimal_mass: float


@dataclass
class ImagePrediction:
    """Everything ctiqa says about one image. Fields are None when not computed.

    Attributes:
        text: generated answer (None with ``generate=False``).
        parsed_score, parse_rule: :func:`ctiqa.scoring.parse_score_detailed` of ``text``.
        prob_score, prob_std, prob_mass, prob_decimal_mass, prob_digits: :class:`ProbabilityScore` fields.
    """

    text: str | None = None
    parsed_score: float | None = None
    parse_rule: str | None = None
    prob_score: float | None = None
    prob_std: float | None = None
    prob_mass: float | None = None
    prob_decimal_mass: float | None = None
    prob_digits: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- loading
def _is_adapter_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").exists() and not (p / "config.json").exists()


def trained_settings_of(source: str | None) -> TrainedSettings | None:
    """The training settings beside a model or adapter: read from a local folder, else fetched from the Hub repo
    when it has them (None when it does not, or offline)."""
    if source is None:
        return None
    if Path(source).expanduser().is_dir():
        return read_settings(Path(source).expanduser())
    from ctiqa.model_settings import SETTINGS_FILE

    try:
        from huggingface_hub import hf_hub_download

        return read_settings(Path(hf_hub_download(source, SETTINGS_FILE)).parent)
    except Exception:  # noqa: BLE001 - not on the Hub, offline, no access: nothing recorded
        return None


def load_model(model: str | None = None, adapter: str | None = None, *, precision: str = "auto",
               device: str | None = None) -> LoadedModel:
    """Load a base model (plus an optional PEFT adapter) and its processor for inference.

    Args:
        model: Hub id or local folder of an image-text-to-text model (e.g. ``google/medgemma-4b-it``, a tiny model
            folder, a merged/fully fine-tuned output). A folder holding only an adapter (``adapter_config.json``)
            is accepted too: it is used as ``adapter`` and its ``base_model_name_or_path`` as the model.
            None: the adapter's base model.
        adapter: PEFT adapter id or folder (as saved by ``recipes/sft.py``), or None.
        precision: one of :data:`ctiqa.model_settings.PRECISIONS`: "auto" loads as training did, from the
            ``ctiqa_training.json`` beside the adapter or model (an adapter trained on a 4-bit base gets that base:
            quant type, double quantisation, compute and storage dtypes as recorded; a model trained in fp32 runs in
            fp32), else bf16 on CUDA and fp32 on CPU; "fp32", "bf16", or "4bit" force it
            (:func:`ctiqa.model_settings.inference_precision`).
        device: "cpu", "cuda", "cuda:1"...; default CUDA when available, else CPU.
    Returns:
        :class:`LoadedModel` in eval mode. The processor comes from the adapter folder when it holds one
        (``recipes/sft.py`` saves it there), else from the model.
    Raises:
        CTIQAError: neither model nor adapter given, unknown precision, or loading failed (message names what).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    if precision not in PRECISIONS:
        raise CTIQAError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    requested = precision
    if model and adapter is None and _is_adapter_dir(model):
        model, adapter = None, model
    trained_on = None  # the base the adapter was trained on (its adapter_config.json)
    if adapter is not None:
        from peft import PeftConfig

        check_source_folder(adapter, "adapter", "adapter_config.json")
        try:
            trained_on = PeftConfig.from_pretrained(adapter).base_model_name_or_path
        except (OSError, ValueError) as e:
            if model is None:
                raise CTIQAError(f"cannot read the adapter config of {adapter}: {e}") from e
    if model is None:
        if adapter is None:
            raise CTIQAError("give a model (Hub id or folder) or an adapter")
        if not trained_on:
            raise CTIQAError(f"adapter {adapter}: adapter_config.json has no base_model_name_or_path; pass --model")
        model = trained_on
    check_source_folder(model, "model", "config.json")
    # an adapter loads onto any base of matching shapes: say when it is not the one it was trained on
    if trained_on and trained_on != model and not (
            Path(trained_on).expanduser().exists() and Path(str(model)).expanduser().exists()
            and os.path.samefile(Path(trained_on).expanduser(), Path(str(model)).expanduser())):
        warnings.warn(f"adapter {adapter} was trained on {trained_on}; it is loaded onto {model}, as asked: the "
                      "scores are those of this pair", CTIQAWarning, stacklevel=2)
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    settings = trained_settings_of(adapter if adapter is not None else model)
    precision, compute = inference_precision(requested, settings, device)

    kwargs: dict[str, Any] = {"dtype": getattr(torch, compute)}
    if precision == "4bit":
        bnb = bnb_4bit_settings(settings, compute)
        bnb["bnb_4bit_compute_dtype"] = getattr(torch, bnb["bnb_4bit_compute_dtype"])
        bnb["bnb_4bit_quant_storage"] = getattr(torch, bnb["bnb_4bit_quant_storage"])
        kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
        kwargs["device_map"] = {"": device}
    try:
        net = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:
        raise CTIQAError(f"cannot load model {model}: {e}") from e
    if precision != "4bit":
        net = net.to(device)
    if adapter is not None:
        from peft import PeftModel

        try:
            net = PeftModel.from_pretrained(net, adapter)
        except (OSError, ValueError) as e:
            raise CTIQAError(f"cannot load adapter {adapter}: {e}") from e
    has_own_processor = adapter is not None and Path(adapter).is_dir() and any(
        (Path(adapter) / f).exists() for f in ("processor_config.json", "preprocessor_config.json"))
    try:
        processor = AutoProcessor.from_pretrained(adapter if has_own_processor else model)
    except (OSError, ValueError) as e:
        raise CTIQAError(f"cannot load the processor of {adapter if has_own_processor else model}: {e}") from e
    processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
    net.eval()
    if precision == "4bit" and compute == "float32":
        # bitsandbytes on a CPU with AVX512-BF16 repacks 4-bit weights at the first eval-mode forward and computes
        # in bf16 whatever the compute dtype (bitsandbytes/nn/modules.py Linear4bit.forward); training ran in fp32.
        # Off, the layer dequantises to the compute dtype as on a GPU: scores as trained, and as an fp32 export.
        for m in net.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return LoadedModel(net, processor, str(model), adapter and str(adapter), precision, device, compute, settings)


# ---------------------------------------------------------------------------------------------------- prompts
def chat_prompt(processor: Any, fmt: str = DEFAULT_TARGET_FORMAT) -> str:
    """The training prompt as text: chat template over :func:`ctiqa.prompts.prompt_messages` with the generation
    prompt (``...<start_of_turn>model\\n`` for Gemma 3). Raises ValueError for an unknown format."""
    if fmt not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {fmt!r}; choose one of {', '.join(TARGET_FORMATS)}")
    return processor.apply_chat_template(prompt_messages(fmt), add_generation_prompt=True, tokenize=False)


def _encode(lm: LoadedModel, texts: list[str], images: Sequence[Any]) -> dict[str, Any]:
    batch = lm.processor(text=texts, images=[[check_model_image(im)] for im in images], padding=True,
                         return_tensors="pt", add_special_tokens=False)
    dtype = lm.model.dtype
    return {k: (v.to(lm.device, dtype=dtype) if v.is_floating_point() else v.to(lm.device)) for k, v in batch.items()}


def score_token_ids(lm: LoadedModel, fmt: str) -> dict[str, Any]:
    """Where the score is read and which tokens spell it, checked against the tokenizer.

    Two layouts are accepted: ``prompt + "Score: "`` followed by the digit token ``d`` (Gemma 3 / MedGemma and the
    tiny model: SentencePiece ``split_digits`` keeps ``▁`` apart from digits), or ``prompt + "Score:"`` followed by
    a single token ``"▁d"`` (tokenizers that fold the space into the digit). Either way ``"d.e"`` must continue as
    exactly the tokens (integer digit, ``.``, decimal digit ``e``) for every d in 0..4 and e in 0..9.

    Returns:
        dict: ``prompt`` (text up to the score position), ``int_digits`` (5 token ids for the integer part 0-4),
        ``digits`` (10 token ids of ``0``-``9`` for the decimal), ``dot`` (id of ``.``).
    Raises:
        CTIQAError: neither layout holds (digits are not single tokens).
    """
    if fmt in lm._tokens:
        return lm._tokens[fmt]
    tok = lm.processor.tokenizer
    chat = chat_prompt(lm.processor, fmt)
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    dot = tok.convert_tokens_to_ids(".")

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def layout(prompt: str, lead: str) -> list[int] | None:
        base = encode(prompt)
        int_digits = []
        for d in range(5):
            first = encode(f"{prompt}{lead}{d}.0")
            if first[:len(base)] != base or len(first) != len(base) + 3:
                return None
            if any(encode(f"{prompt}{lead}{d}.{e}") != base + [first[len(base)], dot, digits[e]] for e in range(10)):
                return None
            int_digits.append(first[len(base)])
        return int_digits

    for prefix, lead in ((SCORE_PREFIX, ""), (SCORE_PREFIX.rstrip(), " ")):
        int_digits = layout(chat + prefix, lead)
        if int_digits is not None:
            lm._tokens[fmt] = {"prompt": chat + prefix, "int_digits": int_digits, "digits": digits, "dot": dot}
            return lm._tokens[fmt]
    raise CTIQAError(
        f"tokenizer of {lm.model_id}: '{SCORE_PREFIX}d.e' does not split into single tokens (digit, '.', digit) "
        "after the prompt; probability scores need single-token digits (as in Gemma 3)")


# ---------------------------------------------------------------------------------------------------- inference
def generate_texts(lm: LoadedModel, images: Sequence[Any], *, fmt: str = DEFAULT_TARGET_FORMAT,
                   max_new_tokens: int = 512, batch_size: int = 4) -> list[str]:
    """Greedy answers (``do_sample=False``), batched with left padding.

    Args:
        images: RGB PIL images (any size; the processor resizes). max_new_tokens: answer budget in tokens (the
            paper's rationales are ~370 words, ~500 tokens: 512 is enough for score-first; a cut answer of a
            score-first model still holds its score).
    Returns:
        one decoded answer per image, special tokens removed, stripped.
    """
    import torch

    prompt = chat_prompt(lm.processor, fmt)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        inputs = _encode(lm, [prompt] * len(chunk), chunk)
        with torch.inference_mode():
            gen = lm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in lm.processor.batch_decode(new, skip_special_tokens=True)]
    return out


def score_from_distributions(p_int: list[float], p_dec: list[list[float]], mass: float,
                             dec_mass: list[float]) -> ProbabilityScore:
    """Combine digit distributions into a :class:`ProbabilityScore` (used in-process and by :mod:`ctiqa.serving`).

    Args:
        p_int: probabilities of the integer digits 0..4, renormalised (5 floats summing to 1).
        p_dec: for each integer d = 0..3, the renormalised probabilities of the decimal digits 0..9 after ``d.``
            (4 lists of 10 floats). mass: raw probability on ``0``-``4`` at the score position, in [0, 1].
        dec_mass: raw probability on ``0``-``9`` after each ``d.`` (4 floats in [0, 1]).
    Returns:
        expected score clipped to [0, 4] with its standard deviation over the 41 values 0.0, 0.1, ..., 3.9, 4.
    """
    values, probs = [], []
    for d in range(4):
        for e in range(10):
            values.append(d + e / 10.0)
            probs.append(p_int[d] * p_dec[d][e])
    values.append(SCORE_MAX)
    probs.append(p_int[4])
    mean = sum(p * v for p, v in zip(probs, values, strict=True))
    var = sum(p * (v - mean) ** 2 for p, v in zip(probs, values, strict=True))
    w = sum(p_int[:4])
    dmass = sum(p_int[d] * dec_mass[d] for d in range(4)) / w if w > 0 else 1.0
    return ProbabilityScore(min(max(mean, 0.0), SCORE_MAX), math.sqrt(max(var, 0.0)), p_int, mass, dmass)


def check_score_only(fmt: str) -> None:
    """Refuse ``--score-only`` for a format whose answer does not start with the score: the probability score is
    read at the score's position (:func:`probability_scores`), so such a run would give no score at all.

    Raises:
        CTIQAError: ``fmt`` not in :data:`PROBABILITY_FORMATS`.
    """
    if fmt not in PROBABILITY_FORMATS:
        raise CTIQAError(f"--score-only reads the score from the digit probabilities of an answer that starts with it "
                         f"({', '.join(PROBABILITY_FORMATS)}); format {fmt!r} does not: drop --score-only (the score "
                         "is then parsed from the generated answer)")


def probability_scores(lm: LoadedModel, images: Sequence[Any], *, fmt: str = DEFAULT_TARGET_FORMAT,
                       batch_size: int = 8) -> list[ProbabilityScore]:
    """Scores from digit-token probabilities, without generating (see the module docstring).

    Cost per batch: one forward pass over the prompt (image included) plus one two-token pass over 4 copies of its
    key/value cache. Only the last position's logits are computed (``logits_to_keep=1``).

    Args:
        images: RGB PIL images. fmt: "score-first" or "score-only" (the answer must start with ``Score: ``).
    Returns:
        one :class:`ProbabilityScore` per image.
    Raises:
        CTIQAError: a format without a leading score, or a tokenizer without single-token digits.
    """
    import torch

    if fmt not in PROBABILITY_FORMATS:
        raise CTIQAError(f"probability scores need an answer that starts with the score ({', '.join(PROBABILITY_FORMATS)}); "
                         f"format {fmt!r} does not")
    ids = score_token_ids(lm, fmt)
    int_digits = torch.tensor(ids["int_digits"], device=lm.device)
    digits = torch.tensor(ids["digits"], device=lm.device)
    out: list[ProbabilityScore] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        inputs = _encode(lm, [ids["prompt"]] * len(chunk), chunk)
        mask = inputs["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            first = lm.model(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
            p = first.logits[:, -1].float().softmax(-1)[:, int_digits]       # (B, 5)
            cache = first.cache if hasattr(first, "cache") else first.past_key_values
            cache.batch_repeat_interleave(4)
            b = len(chunk)
            cont = torch.tensor([[ids["int_digits"][d], ids["dot"]] for _ in range(b) for d in range(4)],
                                device=lm.device)
            last = pos[:, -1:].repeat_interleave(4, 0)
            second = lm.model(
                input_ids=cont,
                attention_mask=torch.cat([mask.repeat_interleave(4, 0), torch.ones_like(cont)], dim=1),
                position_ids=torch.cat([last + 1, last + 2], dim=1),
                cache=cache, use_cache=True, logits_to_keep=1)
            q = second.logits[:, -1].float().softmax(-1)[:, digits].view(b, 4, 10)  # (B, 4, 10)
        for j in range(b):
            pi = p[j]
            mass = float(pi.sum())
            p_int = (pi / pi.sum()).tolist() if mass > 0 else [0.2] * 5
            qj = q[j]
            dec_mass = qj.sum(-1)
            p_dec = [(qj[d] / dec_mass[d]).tolist() if dec_mass[d] > 0 else [0.1] * 10 for d in range(4)]
            out.append(score_from_distributions(p_int, p_dec, mass, dec_mass.tolist()))
    return out


def predict_images(lm: LoadedModel, images: Sequence[Any], *, fmt: str = DEFAULT_TARGET_FORMAT,
                   generate: bool = True, probability: bool = True, max_new_tokens: int = 512,
                   batch_size: int = 4) -> list[ImagePrediction]:
    """Generated answer + parsed score and/or probability score for each image (the API ``ctiqa predict`` uses).

    Args:
        images: RGB PIL images (:func:`ctiqa.imaging.render` output). fmt: the model's trained target format.
        generate: generate the answer and parse its score. probability: read the probability score (silently
            skipped for the rationale-first format, which has no leading score).
        max_new_tokens, batch_size: see :func:`generate_texts` (probability passes use the same batch size).
    Returns:
        one :class:`ImagePrediction` per image, in order.
    """
    preds = [ImagePrediction() for _ in images]
    if generate:
        for pr, text in zip(preds, generate_texts(lm, images, fmt=fmt, max_new_tokens=max_new_tokens,
                                                  batch_size=batch_size), strict=True):
            parsed = parse_score_detailed(text)
            pr.text, pr.parsed_score, pr.parse_rule = text, parsed.value, parsed.rule
    if probability and fmt in PROBABILITY_FORMATS:
        for pr, ps in zip(preds, probability_scores(lm, images, fmt=fmt, batch_size=batch_size), strict=True):
            pr.prob_score, pr.prob_std, pr.prob_mass = ps.score, ps.std, ps.mass
            pr.prob_decimal_mass, pr.prob_digits = ps.decimal_mass, ps.p_digits
    return preds

