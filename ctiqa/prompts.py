"""Every prompt and target text ctiqa uses, in one place, under one version string.

The student instruction, the target formats, the teacher prompt and the zero-shot prompt all live here so that
the dataset builder, the SFT recipe, the evaluation harness and ``ctiqa predict`` speak exactly the same words.
Change any text here -> bump :data:`PROMPT_VERSION` (it is recorded in dataset cards, teacher caches and
``results.json``; the teacher cache is keyed by it, so a new version re-asks the teacher).

Score scale: :mod:`ctiqa.scale` (LDCTIQA 2023, 0 bad ... 4 excellent, labels in steps of 0.2).
"""

from __future__ import annotations

from typing import Any

from ctiqa.scale import SCALE_TEXT, SCORE_MAX, SCORE_MIN

PROMPT_VERSION = "ctiqa-prompt-v1"

#: Target text formats. ``score-first`` is the paper's (``Score: 2.2\nReasoning: ...``); the score comes first so
#: that one forward pass reads it from token probabilities. ``score-only`` is the stronger score baseline.
TARGET_FORMATS = ("score-first", "score-only", "rationale-first")
DEFAULT_TARGET_FORMAT = "score-first"

_TASK = (
    "You are a radiologist assessing the technical image quality of one axial CT slice shown in a soft-tissue "
    "window. Judge noise, streak artifacts, sharpness of structure edges and how well low-contrast soft tissue "
    f"can be distinguished. Rate the overall diagnostic quality on a continuous scale ({SCALE_TEXT})."
)

_ANSWER = {
    "score-first": (
        "Answer in exactly this format: first line 'Score: ' followed by the score with one decimal, "
        "then a line starting with 'Reasoning: ' that explains the score from what is visible in this image."
    ),
    "score-only": "Answer with one line: 'Score: ' followed by the score with one decimal.",
    "rationale-first": (
        "Answer in exactly this format: a line starting with 'Reasoning: ' that explains the quality from what is "
        "visible in this image, then a last line 'Score: ' followed by the score with one decimal."
    ),
}


def _check_format(fmt: str) -> str:
    if fmt not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {fmt!r}; choose one of {', '.join(TARGET_FORMATS)}")
    return fmt


def instruction(fmt: str = DEFAULT_TARGET_FORMAT) -> str:
    """The user instruction the student (and zero-shot models) see beside the image.

    Args:
        fmt: one of :data:`TARGET_FORMATS`.
    Raises:
        ValueError: unknown format.
    """
    return f"{_TASK}\n{_ANSWER[_check_format(fmt)]}"


def format_score(score: float) -> str:
    """Score as written in targets: one decimal, e.g. ``2.2``. LDCTIQA training labels are multiples of 0.2.

    Raises:
        ValueError: score outside [0, 4] or not finite.
    """
    s = float(score)
    if not (SCORE_MIN <= s <= SCORE_MAX):
        raise ValueError(f"score {score!r} is outside [{SCORE_MIN}, {SCORE_MAX}]")
    return f"{s:.1f}"


def format_target(score: float, rationale: str | None, fmt: str = DEFAULT_TARGET_FORMAT) -> str:
    """The assistant target text.

    ``score-first``: ``"Score: 2.2\\nReasoning: <rationale>"``; ``score-only``: ``"Score: 2.2"``;
    ``rationale-first``: ``"Reasoning: <rationale>\\nScore: 2.2"``.

    Raises:
        ValueError: unknown format, score outside [0, 4], or a missing rationale for a format that needs one.
    """
    _check_format(fmt)
    s = format_score(score)
    if fmt == "score-only":
        return f"Score: {s}"
    if not rationale or not rationale.strip():
        raise ValueError(f"target format {fmt!r} needs a non-empty rationale")
    r = " ".join(rationale.split())
    if fmt == "score-first":
        return f"Score: {s}\nReasoning: {r}"
    return f"Reasoning: {r}\nScore: {s}"


def prompt_messages(fmt: str = DEFAULT_TARGET_FORMAT) -> list[dict[str, Any]]:
    """The conversational prompt (TRL prompt/completion format): one user turn holding the image and the text.

    Returns ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction(fmt)}]}]``;
    the image itself travels in the example's ``images`` column.
    """
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction(fmt)}]}]


def completion_messages(target: str) -> list[dict[str, Any]]:
    """The conversational completion: ``[{"role": "assistant", "content": [{"type": "text", "text": target}]}]``."""
    return [{"role": "assistant", "content": [{"type": "text", "text": target}]}]


# --------------------------------------------------------------------------------------------------- teacher
#: The teacher is given the radiologists' score and asked to explain it (post-hoc, as in the paper), describing
#: only what is visible in the one rendered image the student will see. It must answer in JSON
#: (see :data:`TEACHER_RESPONSE_SCHEMA`).
TEACHER_SYSTEM = (
    "You are an experienced radiologist who teaches CT image quality assessment. You write concise, factual "
    "quality reports. You describe only what is visible in the single image you are given."
)


def teacher_prompt(score: float, findings: dict[str, Any] | None = None, feedback: str | None = None) -> str:
    """The teacher's instruction for one image whose radiologist score is ``score`` (0-4).

    Args:
        score: the true score (0-4).
        findings: the grounding of :func:`grounding_text` (``noise_hu``, ``noise_severity``, ``streaks``,
            ``streaks_source``), measured on the image the teacher sees (ctiqa.findings); the teacher is asked
            for a report consistent with it. None: the ungrounded prompt of the paper.
        feedback: why the previous answer was rejected (the audit's evidence); the teacher is asked to avoid it.
    Raises:
        ValueError: score outside [0, 4].
    """
    s = format_score(score)
    text = (
        f"This axial CT slice, shown in a soft-tissue window (W350/L40), was rated {s} on a 0-4 image quality "
        f"scale ({SCALE_TEXT}) by a panel of radiologists. Explain why this image deserves a quality score of "
        f"{s}. Describe the noise level and texture, any streak artifacts, the sharpness of organ and vessel "
        "edges, and low-contrast detectability, and how they limit diagnostic use. Describe only what is visible "
        "in this one image: do not mention other views, crops, zoomed regions, other slices, the score panel or "
        "these instructions, and do not mention artifacts that are not present. Do not greet or address the "
        "reader. Write 80-200 words in the third person, as a report. Return JSON with the keys "
        '"rationale" (string) and "score" (the number you were given).'
    )
    if findings:
        text += " " + grounding_text(findings)
    if feedback:
        text += (f" A previous report for this image was rejected by our quality check ({feedback}). Write a new "
                 "report that avoids this.")
    return text


def grounding_text(findings: dict[str, Any]) -> str:
    """The sentences of the grounded teacher prompt that carry the measured findings (ctiqa.findings).

    ``findings``: ``noise_hu`` (HU or None), ``noise_severity`` (none/mild/moderate/severe or None), ``streaks``
    (True/False/None), ``streaks_source`` ("simulator" when the simulator's truth stands in, "measured" for the
    validated measured call, "unmeasured": the teacher is told streaks could not be measured).
    Noise bands: :data:`ctiqa.vocabulary.NOISE_BANDS_HU`.
    """
    from ctiqa.vocabulary import NOISE_BANDS_HU

    bands = ", ".join(f"{name} below {bound:g} HU" for bound, name in NOISE_BANDS_HU if bound != float("inf"))
    parts = ["Measurements of this same image (transparent image analysis, not a model):"]
    if findings.get("noise_hu") is not None and findings.get("noise_severity"):
        word = {"none": "no more than routine (describe it as minimal or low)"}.get(findings["noise_severity"],
                                                                                     findings["noise_severity"])
        parts.append(f"quantum noise of about {findings['noise_hu']:.0f} HU standard deviation in soft tissue, i.e. "
                     f"{word} noise on our bands ({bands}, severe above);")
    streaks = findings.get("streaks")
    if streaks is not None and findings.get("streaks_source") in ("simulator", "measured"):
        parts.append("sparse-view streak artifacts are " + ("present." if streaks else "absent."))
    else:
        parts.append("streak artifacts could not be measured reliably: mention streaks only if clearly visible.")
    parts.append("Your report must agree with these measurements. Do not describe ring, motion, metal or beam "
                 "hardening artifacts unless they are unmistakable in this image.")
    return " ".join(parts)


#: JSON schema for the teacher's answer (google-genai ``response_schema`` / OpenAI ``json_schema``).
TEACHER_RESPONSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"rationale": {"type": "string"}, "score": {"type": "number"}},
    "required": ["rationale", "score"],
}
