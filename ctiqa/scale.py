"""The 0-4 image-quality scale: its range, anchor labels, quality words and label step, in one place.

Source: LDCTIQA 2023 (Lee et al., Medical Image Analysis 99, 103343, 2025). Each slice's label is the mean of five
radiologists' ratings on a five-point scale, 0 bad, 1 poor, 2 fair, 3 good, 4 excellent, so training labels are
multiples of 0.2. Prompts, the score parser, the rationale checks, the simulator and the dataset reader import
these facts from here; change them here only.
"""

from __future__ import annotations

import math
from numbers import Real

#: Lowest and highest score (float, unitless).
SCORE_MIN = 0.0
SCORE_MAX = 4.0
#: Step between LDCTIQA labels: the mean of five integer ratings.
LABEL_STEP = 0.2

#: Anchor labels of the five-point scale (integer rating -> word).
SCALE_LABELS: dict[int, str] = {0: "bad", 1: "poor", 2: "fair", 3: "good", 4: "excellent"}
#: The scale as written in prompts: ``"0 = bad, 1 = poor, 2 = fair, 3 = good, 4 = excellent"``.
SCALE_TEXT = ", ".join(f"{k} = {v}" for k, v in SCALE_LABELS.items())

#: Other words for the anchors that models and teachers use for overall quality (word -> anchor).
QUALITY_SYNONYMS: dict[str, int] = {"adequate": 2, "acceptable": 2, "non-diagnostic": 0, "nondiagnostic": 0,
                                    "unacceptable": 0}
#: Every overall-quality word and its anchor on the scale: :data:`SCALE_LABELS` inverted plus the synonyms.
QUALITY_LABELS: dict[str, int] = {**{w: k for k, w in SCALE_LABELS.items()}, **QUALITY_SYNONYMS}


def in_scale(value: float) -> bool:
    """True when ``value`` is a finite real number in [:data:`SCORE_MIN`, :data:`SCORE_MAX`].

    Booleans and strings are not scores (``True`` is not 1.0; ``"3"`` is not 3.0); NaN and infinities are not.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    v = float(value)
    return math.isfinite(v) and SCORE_MIN <= v <= SCORE_MAX
