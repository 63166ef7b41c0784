"""Reading a 0-4 quality score out of a model's text answer.

Two kinds of answer reach the parser: our trained formats (``Score: 2.2`` on the first line, or on the last line for
the rationale-first format; see :mod:`ctiqa.prompts`) and free prose from zero-shot models (Gemini, base
MedGemma). The parser is strict for the first and flexible for the second, and it never guesses:

1. ``strict-first``: the text starts with a line ``Score: x.x`` (score-first / score-only formats).
2. ``strict-last``: the last non-empty line is ``Score: x.x`` (rationale-first format).
3. ``json``: a JSON object (bare, in a ```json fence or inside prose; the last one that has a score) with a key
   ``score``, ``rating``, ``quality_score``, ``overall_score``, ``grade`` ... (:data:`JSON_KEYS`, case-insensitive,
   also one level down): ``{"score": 2.6, "reasoning": "..."}``, ``{"rating": 3}``. What zero-shot models and
   score-only fine-tunes often emit.
4. ``labelled``: the LAST score that a label introduces anywhere in the text: ``score``, ``rating``, ``rated``,
   ``grade``, ``quality score``, ``overall``, ``final answer``, markdown bold (``**Score:** 3``), a verb phrase
   (``I would rate the overall quality as 3``, ``give it a 3``). Values may be decimals, number words
   (``three``), ``x/4``, ``x out of 4``, or a range (``2-3``, ``2 to 3``, ``between 2 and 3``: its midpoint).
   A label may carry an echoed scale: ``Quality (0-4): 3``.
5. ``fraction``: with no label, the last ``x/4`` or ``x out of 4``.
6. ``bare-number``: the whole answer is one number (``3.2``).

A decimal comma is read (``Score: 3,5`` is 3.5; one or two digits after the comma, so ``1,200`` is no score).
A value followed by a unit (mm, HU, kV, slices, views, %) or by a finding it grades (``grade 2 motion``,
``grade 3 streaking``) is not a score: a long report that only grades an artifact gives ``no-score``.

Before any of this, an echoed scale is blanked out so it can never be read as the score: ``(0-4)``,
``from 0 (very poor) to 4 (excellent)``, ``on a scale of 0-4``, ``between 0 and 4``, ``0 = bad ... 4 = excellent``.
A value outside [0, 4] (``Score: 10.0``, ``7/10``), or one followed by another scale (``Score: 3 (1-5 scale)``),
gives ``None`` with rule ``out-of-range``; an exponent (``1e1``) is not read as a score; no score gives
``None`` with rule ``no-score``. A failure is ``None`` and is counted by the metrics, never silently 0. There is
deliberately no "first number in [0, 4] anywhere" fallback (the paper's parser had one: it read list numbering,
slice thickness or the echoed scale as the score).

Score scale [0, 4]: LDCTIQA 2023 (Lee et al., Medical Image Analysis 99, 103343, 2025).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ctiqa.scale import QUALITY_LABELS, SCORE_MAX, SCORE_MIN, in_scale

#: Rule names recorded per sample (``predictions.jsonl`` ``parse_rule``).
RULES = ("strict-first", "strict-last", "json", "labelled", "fraction", "bare-number", "out-of-range", "no-score")
#: Keys of a JSON answer that hold the score, in order of preference (case-insensitive).
JSON_KEYS = ("score", "quality_score", "overall_score", "overall_quality_score", "image_quality_score", "rating",
             "quality_rating", "overall_rating", "grade", "quality", "overall", "overall_quality", "final_score")


@dataclass(frozen=True)
class ParsedScore:
    """Result of :func:`parse_score_detailed`.

    Attributes:
        value: the score in [0, 4], or None (no score / out of range).
        rule: which rule decided, one of :data:`RULES`.
        matched: the text span the value was read from (None when nothing matched).
    """

    value: float | None
    rule: str
    matched: str | None = None


# ------------------------------------------------------------------------------------------------- patterns
# A number: ``3``, ``2.6``, ``.5``, a decimal comma ``3,5`` (one or two digits: ``1,200`` is not a number here).
_NUM = r"(?:(?<![\w.])-(?=\d))?(?<![\d.,])(?:\d+(?:\.\d+|,\d{1,2}(?!\d))?|\.\d+)(?![\d])(?![.,]\d)(?![eE][+-]?\d)"
_WORDS = {"zero": 0.0, "one": 1.0, "two": 2.0, "three": 3.0, "four": 4.0}
_WORD = r"\b(?:zero|one|two|three|four)\b(?!\s+of\b)(?!-)"
_VAL = rf"(?:{_NUM}|{_WORD})"
_DASH = r"(?:-|–|—|to)"
_QUALITY_WORD = rf"(?:very\s+)?(?:{'|'.join(sorted(map(re.escape, QUALITY_LABELS), key=len, reverse=True))})"

# A value: optional "between", number or word, an optional range end, an optional "/4" or "out of 4" denominator,
# and the next token (to reject units such as mm, %, HU).
_VALUE = (
    rf"(?P<between>between\s+)?(?P<a>{_VAL})"
    rf"(?:\s*(?:{_DASH}|(?(between)and|(?!)))\s*(?P<b>{_VAL}))?"
    rf"(?:\s*(?:/|out\s+of)\s*(?P<den>{_VAL}))?"
    r"(?P<unit>\s*(?:mm|cm|%|hu|kv|kvp|mas|ms|views?|slices?|x\b|times)\b|\s*%"
    # a graded finding on the same line: "grade 2 motion", "grade 3 streaking", "rated 2 noise"
    r"|[ \t]+(?:-\s*)?(?:motion|artifacts?|artefacts?|streak\w*|noise|noisy|metal|ring|beam|blur\w*|mottl\w*|"
    r"lesions?|nodules?|stenosis|fatty|steatosis|hepatic|renal|injury|trauma|disease|fibrosis|emphysema)\b)?"
)

_LABEL = (
    r"(?:\boverall(?:\s+(?:image|diagnostic|technical))?(?:\s+quality)?(?:\s+(?:score|rating|grade|assessment))?"
    r"|\b(?:image\s+|diagnostic\s+|technical\s+|final\s+|my\s+|the\s+)?quality\s+(?:score|rating|grade)"
    r"|\bfinal\s+(?:score|rating|grade|answer)"
    r"|\b(?:image\s+)?quality(?=[\s()\[\]]*[:=])|\bscore[ds]?\b|\brating\b|\brated\b|\bgrade[ds]?\b)"
)
# Between a label and its value: punctuation and a few linking words ("Score: ", "score of", "is approximately").
_GAP = (
    r"(?:[\s:=()\[\]|]|-(?!\d)|–|—|\b(?:is|of|would\s+be|will\s+be|be|at|as|a|an|approximately|about|around|roughly|"
    r"estimated|assigned|given|here|this\s+image|this\s+slice|the\s+image)\b|~|≈)*"
)
# Verb phrases: "I would rate the overall diagnostic quality as 3", "give it a 3", "score this image 2.5".
_VERB = (
    r"\b(?:rate|score|grade|give|assign|award)\b"
    r"(?:\s+(?:it|this|that|the|its|image|slice|scan|overall|diagnostic|technical|image|quality))*"
    r"(?:\s+(?:as|a|an|at|of|with))*\s*(?:score\s+of\s+)?"
)
_LABELLED_RE = re.compile(
    rf"(?:{_LABEL}{_GAP}|{_VERB})(?:{_QUALITY_WORD}\s*[(\[,\-–—:]?\s*)?{_VALUE}", re.IGNORECASE
)
_FRACTION_RE = re.compile(rf"(?P<a>{_VAL})\s*(?:/|out\s+of)\s*(?P<den>{_VAL})", re.IGNORECASE)
_STRICT_LAST = re.compile(rf"^[ \t]*Score:[ \t]*(?P<a>{_NUM})[ \t]*$")
# "Score: 2.2" at the very start, followed by a line break, white space or the end (not by a range or "/4").
_STRICT_FIRST = re.compile(rf"\A\s*Score:[ \t]*(?P<a>{_NUM})(?=\s|\Z)(?![ \t]*(?:/|-|–|—|to\b|out\b))")

# Echoed scales, blanked before flexible matching.
_ZERO = r"(?<![\d.])0(?:\.0)?(?![\d.])"
_FOUR = r"(?<![\d.])4(?:\.0)?(?![\d]|\.\d)"
_PAREN = r"(?:\s*\([^()\n]{0,40}\))?"
_LEGEND_ITEM = rf"(?<![\d.])[0-4](?:\.0)?\s*(?:=|:|-|–|—|\()\s*{_QUALITY_WORD}\)?"
_SCALE_RES = [
    # "from 0 (very poor) to 4 (excellent)", "0-4", "0 to 4", "(0–4)", "between 0 and 4"
    re.compile(rf"(?:between[ \t]+)?{_ZERO}{_PAREN}[ \t]*(?:{_DASH}|and)[ \t]*{_FOUR}{_PAREN}", re.IGNORECASE),
    # "on a scale of 1 to 10", "scale from 1-5", "range of 0 to 100"
    re.compile(rf"\b(?:scale|range)\s+(?:of|from)\s+{_NUM}\s*{_DASH}\s*{_NUM}", re.IGNORECASE),
    # "0 = bad, 1 = poor, ..., 4 = excellent" (two or more legend items) and any single "4 = excellent"
    re.compile(rf"{_LEGEND_ITEM}(?:[\s,;/]*(?:and|or|\.\.\.|…)?[\s,;/]*{_LEGEND_ITEM})+", re.IGNORECASE),
    re.compile(rf"(?<![\d.])[0-4](?:\.0)?\s*=\s*{_QUALITY_WORD}", re.IGNORECASE),
]
_MARKDOWN = re.compile(r"[*_`#>]+")


# Another scale named right after the value: "Score: 3 (1-5 scale)", "2.5 (on a 0-10 scale)".
_SCALE_AFTER = re.compile(r"\A[^\n\d]{0,12}?(\d+)\s*(?:-|–|—|to)\s*(\d+)[\s-]*(?:point\s+)?scale", re.IGNORECASE)


def _other_scale_after(text: str, end: int) -> bool:
    """True when the words right after a value (``text[end:]``) name a scale other than 0-4."""
    m = _SCALE_AFTER.match(text[end:end + 60])
    return bool(m) and (int(m.group(1)), int(m.group(2))) != (int(SCORE_MIN), int(SCORE_MAX))


# ------------------------------------------------------------------------------------------------- helpers
def _number(token: str | None) -> float | None:
    if token is None:
        return None
    t = token.strip().lower()
    return _WORDS[t] if t in _WORDS else float(t.replace(",", "."))


_in_range = in_scale


def _blank_scales(text: str) -> str:
    for rx in _SCALE_RES:
        text = rx.sub(lambda m: " " * len(m.group(0)), text)
    return text


def _candidate(m: re.Match) -> tuple[float, bool] | None:
    """(value, valid) for one labelled / fraction match; None when it is not a score (a unit follows)."""
    if m.groupdict().get("unit"):
        return None
    a, b, den = _number(m.group("a")), _number(m.groupdict().get("b")), _number(m.group("den"))
    if (den is not None and den != SCORE_MAX) or _other_scale_after(m.string, m.end()):
        return (a, False)  # "7/10", "3/5", "3 (1-5 scale)": another scale
    if b is not None:
        if not (_in_range(a) and _in_range(b) and a <= b):
            return (a, False)
        return ((a + b) / 2.0, True)
    return (a, _in_range(a))


def _decide(m: re.Match, rule: str, text: str) -> ParsedScore | None:
    c = _candidate(m)
    if c is None:
        return None
    value, ok = c
    span = text[m.start("a") if rule != "labelled" else m.start() : m.end()].strip()
    return ParsedScore(value if ok else None, rule if ok else "out-of-range", span)


_JSON_DECODER = json.JSONDecoder()
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)


def _json_value(obj: dict, depth: int = 0) -> tuple[Any, str] | None:
    """(value, key) of the first :data:`JSON_KEYS` key in ``obj`` (or one level down); None when it has none."""
    lower = {str(k).lower().replace(" ", "_"): (k, v) for k, v in obj.items()}
    for key in JSON_KEYS:
        if key in lower:
            k, v = lower[key]
            if isinstance(v, dict) and depth == 0:
                found = _json_value(v, 1)
                if found:
                    return found
                continue
            return v, str(k)
    if depth == 0:
        for v in obj.values():
            if isinstance(v, dict) and (found := _json_value(v, 1)):
                return found
    return None


def _json_score(text: str) -> ParsedScore | None:
    """The score of the last JSON object in ``text`` that holds one (:data:`JSON_KEYS`); None when none does."""
    body = _FENCE.sub(" ", text)
    found = None
    pos = body.find("{")
    while pos != -1:
        try:
            obj, end = _JSON_DECODER.raw_decode(body, pos)
        except ValueError:
            pos = body.find("{", pos + 1)
            continue
        if isinstance(obj, dict) and (kv := _json_value(obj)) is not None:
            value, key = kv
            if isinstance(value, str) and re.fullmatch(rf"\s*{_VAL}\s*", value, re.IGNORECASE):
                value = _number(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                v = float(value)
                ok = _in_range(v)
                found = ParsedScore(v if ok else None, "json" if ok else "out-of-range", body[pos:end].strip())
            else:  # a null or a word ("good"): the JSON says there is no number
                found = ParsedScore(None, "no-score", body[pos:end].strip())
        pos = body.find("{", end)
    return found


# ------------------------------------------------------------------------------------------------- public
def parse_score_detailed(text: str | None) -> ParsedScore:
    """Parse a 0-4 quality score from a model answer and say which rule matched.

    Args:
        text: the model's answer (any string; None or empty gives rule ``no-score``).
    Returns:
        :class:`ParsedScore`; ``value`` is a float in [0, 4] or None. See the module docstring for the rules.
    """
    if not text or not text.strip():
        return ParsedScore(None, "no-score")
    last_line = text.strip().splitlines()[-1]
    for rule, m in (("strict-first", _STRICT_FIRST.match(text)), ("strict-last", _STRICT_LAST.match(last_line))):
        if m:
            v = _number(m.group("a"))
            ok = _in_range(v) and not _other_scale_after(m.string, m.end("a"))
            return ParsedScore(v if ok else None, rule if ok else "out-of-range", m.group(0).strip())

    if "{" in text and (js := _json_score(text)) is not None:
        return js
    flat = _blank_scales(_MARKDOWN.sub(" ", text))
    for rx, rule in ((_LABELLED_RE, "labelled"), (_FRACTION_RE, "fraction")):
        found = [p for p in (_decide(m, rule, flat) for m in rx.finditer(flat)) if p is not None]
        if found:
            return found[-1]

    bare = flat.strip().strip(".!").strip()
    if re.fullmatch(_VAL, bare, re.IGNORECASE):
        v = _number(bare)
        return ParsedScore(v if _in_range(v) else None, "bare-number" if _in_range(v) else "out-of-range", bare)
    return ParsedScore(None, "no-score")

