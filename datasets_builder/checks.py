"""Rationale checks: clean a teacher's rationale, reject it when it cannot be trusted, count artifact terms.

Cleaning (:func:`clean_rationale`) removes what the student must not learn to say: chat boilerplate at the start
("Of course.", "Certainly!", "Sure, here is ...:", "As a radiologist, ..."), persona lines ("I am an experienced
radiologist ..."), Markdown headers/bold/bullets, ``Reasoning:``/``Rationale:`` labels and ``Score: x`` lines
(the target format adds its own), and collapses whitespace.

Rejection rubric (:func:`check_rationale`; reason codes as in ``audit.csv``):

``too_short``
    fewer than ``min_words`` words (default 15).
``too_long``
    more than :data:`MAX_WORDS` words or 20 characters a word on average (the teacher is asked for 80-200 words; a
    runaway answer would become a target longer than any sequence the student trains on).
``unseen_view``
    talks about views the student never sees: crops, zoomed/magnified views, insets, panels, other/adjacent
    slices, "the images"/"these images"/"both images", first/second/left/right image.
``mentions_given_score``
    leaks the set-up: "was rated", "a panel of radiologists", "the given/assigned score", "these instructions".
``contradicts_score``
    overall-quality words at odds with the true score (ctiqa.scale: 0 bad, 1 poor, 2 fair, 3 good,
    4 excellent): for score <= 1.5: excellent, outstanding, pristine, superb, optimal/ideal quality,
    artifact-free, no artifacts, fully diagnostic; for score >= 3.5: severe(ly), non-diagnostic, unreadable,
    uninterpretable, very poor, markedly/heavily/severely degraded. A term preceded (within ~4 words) by a
    negation (no, not, without, free of, absence of, rather than, nor) does not count ("no severe streaks").
``control_tokens``
    holds chat-template control tokens (``<end_of_turn>``, ``<start_of_turn>``, ``<bos>``, ``<eos>``,
    ``<start_of_image>``, ``<|im_end|>`` ...): trained as text they become the tokenizer's special tokens (Gemma's
    ``<end_of_turn>`` is the stop token) in the middle of a target, and the student learns to stop or to open a
    fake turn there.
``secret``
    echoed an API key or token of the environment (:data:`ctiqa.clients.SECRET_ENV_VARS`; replaced by
    :data:`ctiqa.clients.REDACTED` as the answer arrives, so neither the cache nor the dataset holds it).
``teacher_score_mismatch``
    the teacher's JSON ``score`` differs from the true score by more than 0.05 (it ignored the instruction).
``contradicts_findings``
    (with ``grounding``, :func:`ctiqa.findings.grounding`) the rationale's claims
    (:func:`ctiqa.explanations.extract_claims`; negated mentions such as "no metal artifacts" are not claims)
    contradict the image: noise severity two or more bands from the measured class; streaks claimed where there
    are none (simulator truth, or the measured call where it is validated); or, on simulated data, an artifact
    claimed as present that the simulated data is known not to have (``absent_artifacts``:
    :data:`ctiqa.simulation.ABSENT_ARTIFACTS`, metal, ring and motion; evidence "metal artifacts claimed, the
    simulated data has none"). These rows are asked again with the evidence (``--reask``).

Flags (kept rows; counted in the card and printed by ``ctiqa build-dataset``): ``unverified_artifact: NAME`` for
ring, motion, metal or beam hardening claimed as present where nothing says they are absent (real LDCTIQA: its
degradation adds none, but its routine-dose base scans may hold real ones, so unverifiable, not wrong; on simulated
data only beam hardening, which a real base slice such as the skull base can show); ``unverified_streaks`` for
streaks claimed where nothing trustworthy is known about them.

Artifact terms (:data:`ARTIFACT_TERMS`) are counted per rationale for the audit: noise, streak, metal, ring,
motion, beam hardening, blur. LDCTIQA and the simulator only add noise and streaks (design.md §3); metal, ring,
motion and beam hardening mentions are likely hallucinated and are summed up in the dataset card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ctiqa.clients import REDACTED
from ctiqa.vocabulary import AUDIT_TERMS, NEGATION_BEFORE

MIN_WORDS = 15
#: Longer rationales are rejected (``too_long``): the teacher is asked for 80-200 words (ctiqa.prompts); 2.5x that
#: leaves room for a verbose teacher and keeps a runaway answer (a loop, padding) out of the SFT targets.
MAX_WORDS = 500
LOW_SCORE_MAX = 1.5
HIGH_SCORE_MIN = 3.5
SCORE_TOLERANCE = 0.05

_BOILERPLATE_START = re.compile(
    r"^\s*(?:"
    r"(?:of course|certainly|sure|absolutely|okay|ok|great question|happy to help)\b[^.!:\n]*[.!:,]\s*"
    r"|here(?:'s| is| are)\b[^:\n]*:\s*"
    r"|as (?:an? |the )?(?:experienced |expert |board-certified )*(?:radiologist|ai|language model|teacher)"
    r"[^,\n]*,\s*"
    r"|i(?:'d| would) be (?:happy|glad) to[^.!:\n]*[.!:]\s*"
    r")",
    flags=re.IGNORECASE,
)
_PERSONA_SENTENCE = re.compile(
    r"(?:^|(?<=[.!?]\s))(?:i am|i'm) (?:an? )?(?:experienced |expert |board-certified )*(?:radiologist|ai)"
    r"[^.!?\n]*[.!?]\s*",
    flags=re.IGNORECASE,
)
_LABEL = re.compile(r"^\s*(?:reasoning|rationale|explanation|assessment)\s*:\s*", flags=re.IGNORECASE)
_SCORE_LINE = re.compile(r"^\s*(?:\*\*)?\s*(?:quality\s+)?score\s*(?:\*\*)?\s*:.*$", flags=re.IGNORECASE | re.MULTILINE)
_HEADER_LINE = re.compile(r"^\s*#{1,6}\s+.*$", flags=re.MULTILINE)
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", flags=re.MULTILINE)

_UNSEEN_VIEW = re.compile(
    r"\b(?:crop(?:s|ped|ping)?|zoom(?:s|ed|ing)?(?:[- ]in)?|magnif(?:ied|ication|y)|insets?|panels?"
    r"|(?:other|adjacent|neighbou?ring|previous|next|additional) (?:slices?|images?|views?)"
    r"|(?:the|these|both|all|two|several) images|(?:first|second|third|left|right|top|bottom) (?:image|view)"
    r"|image [a-d1-4]\b)",
    flags=re.IGNORECASE,
)
_SETUP_LEAK = re.compile(
    r"\b(?:(?:was|were|been|is) (?:rated|scored|graded)|panel of (?:radiologists|experts|readers)"
    r"|(?:given|assigned|provided|stated|reported) (?:quality )?(?:score|rating)|these instructions|as instructed"
    r"|radiologists? (?:rated|scored|gave))\b",
    flags=re.IGNORECASE,
)
_TOO_GOOD = re.compile(
    r"\b(?:excellent|outstanding|pristine|superb|(?:optimal|ideal|perfect) (?:image )?quality|artifact[- ]free"
    r"|no artifacts?|fully diagnostic)\b",
    flags=re.IGNORECASE,
)
_TOO_BAD = re.compile(
    r"\b(?:severe(?:ly)?|non-?diagnostic|unreadable|uninterpretable|very poor"
    r"|(?:markedly|heavily|severely|grossly) degraded)\b",
    flags=re.IGNORECASE,
)
_NEGATION = NEGATION_BEFORE
#: Chat-template control tokens (Gemma 3 / MedGemma's, and the <|...|> and [INST] forms of other templates).
_CONTROL_TOKEN = re.compile(
    r"<(?:start_of_turn|end_of_turn|bos|eos|pad|unk|mask|start_of_image|end_of_image|image_soft_token|image)>"
    r"|<\|[a-z_]+\|>|\[/?INST\]",
    flags=re.IGNORECASE,
)

#: term -> regex, counted per rationale in the audit (the one vocabulary: ctiqa.vocabulary.AUDIT_TERMS).
ARTIFACT_TERMS: dict[str, re.Pattern[str]] = AUDIT_TERMS


def clean_rationale(text: str) -> str:
    """Remove chat boilerplate, persona lines, Markdown, labels and score lines; collapse whitespace."""
    s = _HEADER_LINE.sub("", text)
    s = _SCORE_LINE.sub("", s)
    s = _BULLET.sub("", s)
    s = s.replace("**", "").replace("__", "")
    s = " ".join(s.split())
    for _ in range(5):  # "Of course. As a radiologist, here is my assessment: Reasoning: ..."
        before = s
        s = _PERSONA_SENTENCE.sub("", _LABEL.sub("", _BOILERPLATE_START.sub("", s))).strip()
        if s == before:
            break
    return s[:1].upper() + s[1:] if s else s


def _unnegated(pattern: re.Pattern[str], text: str) -> list[str]:
    hits = []
    for m in pattern.finditer(text):
        if not _NEGATION.search(text[max(0, m.start() - 40):m.start()]):
            hits.append(m.group(0))
    return hits


@dataclass
class CheckResult:
    """Outcome of :func:`check_rationale`: the cleaned text, rejection reasons (empty = accepted) with evidence,
    and artifact term counts."""

    text: str
    reasons: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    terms: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    @property
    def words(self) -> int:
        return len(self.text.split())


def artifact_counts(text: str) -> dict[str, int]:
    """Mentions of each :data:`ARTIFACT_TERMS` term in ``text``."""
    return {name: len(rx.findall(text)) for name, rx in ARTIFACT_TERMS.items()}


def check_rationale(text: str, score: float, teacher_score: float | None = None,
                    min_words: int = MIN_WORDS, grounding: dict | None = None) -> CheckResult:
    """Clean ``text`` and apply the rubric of the module docstring.

    Args:
        text: the teacher's rationale.
        score: the true score (0-4).
        teacher_score: the score the teacher echoed in its JSON (None: not checked).
        min_words: ``too_short`` threshold.
        grounding: :func:`ctiqa.findings.grounding` of the image (None: no ``contradicts_findings`` check).
    """
    clean = clean_rationale(text or "")
    res = CheckResult(text=clean, terms=artifact_counts(clean))

    def reject(reason: str, found: list[str]) -> None:
        res.reasons.append(reason)
        res.evidence.append(f"{reason}: " + ", ".join(dict.fromkeys(f.lower() for f in found)))

    if res.words < min_words:
        reject("too_short", [f"{res.words} words"])
    if res.words > MAX_WORDS or len(res.text) > 20 * MAX_WORDS:  # also one endless "word" (padding, a loop)
        reject("too_long", [f"{res.words} words, {len(res.text)} characters"])
    if found := _UNSEEN_VIEW.findall(clean):
        reject("unseen_view", found)
    if found := _SETUP_LEAK.findall(clean):
        reject("mentions_given_score", found)
    if found := _CONTROL_TOKEN.findall(clean):
        reject("control_tokens", found)
    if REDACTED in clean:  # the answer echoed an API key or token (redacted on arrival): never keep it
        reject("secret", ["an API key or token from the environment"])
    if score <= LOW_SCORE_MAX and (found := _unnegated(_TOO_GOOD, clean)):
        reject("contradicts_score", found)
    if score >= HIGH_SCORE_MIN and (found := _unnegated(_TOO_BAD, clean)):
        reject("contradicts_score", found)
    if teacher_score is not None and abs(float(teacher_score) - float(score)) > SCORE_TOLERANCE:
        reject("teacher_score_mismatch", [f"teacher said {teacher_score}, true {score}"])
    from ctiqa.explanations import findings_check

    g = grounding or {}
    fc = findings_check(clean, {"noise_severity": g.get("noise_severity"), "streaks": g.get("streaks")})
    found = []
    if fc["noise_contradicts"]:
        found.append(f"noise claimed {fc['claims']['noise']}, measured {fc['noise_measured']}")
    if fc["streaks_contradict"]:
        found.append("streaks claimed, none in the image")
    absent = [a for a in fc["unverified"] if a in (g.get("absent_artifacts") or ())]
    if absent:
        found.append(f"{_names(absent)} claimed, the simulated data has none")
    if found:
        reject("contradicts_findings", found)
    if fc["claims"]["streaks"] not in (None, "absent") and g.get("streaks") is None:
        res.flags.append("unverified_streaks")
    res.flags += [f"unverified_artifact: {a}" for a in fc["unverified"] if a not in absent]
    return res


def _names(artifacts: list[str]) -> str:
    """``["metal", "ring", "motion"]`` -> ``"metal, ring and motion artifacts"``."""
    words = [a.replace("_", " ") for a in artifacts]
    return (", ".join(words[:-1]) + " and " if len(words) > 1 else "") + words[-1] + " artifacts"
