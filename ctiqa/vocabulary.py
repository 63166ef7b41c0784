"""The words of image-quality reports and the severity bands they map to: ONE home, imported everywhere.

Used by the claim reader (:func:`ctiqa.explanations.extract_claims`), the simulated-truth rubric
(:func:`ctiqa.explanations.truth_rubric`), the measured findings (:mod:`ctiqa.findings`), the dataset audit
(:mod:`datasets_builder.checks`) and the template teacher. Pure data, no dependencies.

Severity classes
----------------
Ordered ``none`` < ``mild`` < ``moderate`` < ``severe`` (:data:`SEVERITIES`). A rationale's claim about a
degradation is one of None (not mentioned), ``"absent"``, ``"present"`` (named without a severity), ``"mild"``,
``"moderate"``, ``"severe"`` (:data:`CLAIMS`); ``"absent"`` stands for the class ``none``.

Noise bands (HU, standard deviation of quantum noise in soft tissue)
--------------------------------------------------------------------
``none`` below :data:`NOISE_APPLIED_HU` (17 HU, about twice the simulator's full-dose 9 HU,
:data:`ctiqa.simulation.FULL_DOSE_NOISE_HU`: routine-dose noise is "no excess noise"), ``mild`` below 32 HU,
``moderate`` below 60 HU, else ``severe`` (:data:`NOISE_BANDS_HU`). The bounds are log-evenly spaced over the
simulator's range (9-114 HU, design.md §4); for real scans they are a judgement call, stated here.

Streak bands (projection views of 1024 over 180°; simulated truth only)
------------------------------------------------------------------------
streaks are applied below :data:`STREAK_VIEWS_BELOW` (512) views; ``mild`` for views >= 256, ``moderate`` for
>= 128, else ``severe`` (:data:`STREAK_BANDS_VIEWS`). Measured streaks (:mod:`ctiqa.findings`) are a present /
absent call only.

Terms
-----
Topic terms are matched on whole tokens (hyphenated compounds are one token: "low-contrast" is not "low",
"signal-to-noise" is not "noise"). Severity words (:data:`SEVERITY_TERMS`) name a class; for noise the
"routine level" words (:data:`NOISE_LOW_TERMS`: minimal, low, negligible, little) mean ``absent`` (every CT has
some noise; "minimal noise" is said of a routine-dose image), for streaks they mean ``mild`` (streaks are not
normally there, so "minimal streaking" asserts some). Negation cues (:data:`NEGATIONS`) include "no", "not",
"without", "free of", "absence of", "neither/nor", "n't"; "<term> absent/none/not seen" after the term too.
"""

from __future__ import annotations

import re

# ------------------------------------------------------------------------------------------------ severity bands
SEVERITIES = ("none", "mild", "moderate", "severe")
CLAIMS = (None, "absent", "present", "mild", "moderate", "severe")
#: Claim -> ordinal position on :data:`SEVERITIES` ("present" has none: named without a severity).
CLAIM_RANK = {"absent": 0, "mild": 1, "moderate": 2, "severe": 3}

NOISE_APPLIED_HU = 17.0
#: (upper bound in HU, class): sigma < bound -> class.
NOISE_BANDS_HU = ((NOISE_APPLIED_HU, "none"), (32.0, "mild"), (60.0, "moderate"), (float("inf"), "severe"))
STREAK_VIEWS_BELOW = 512
#: (lower bound in views, class): n_views >= bound -> class (below STREAK_VIEWS_BELOW).
STREAK_BANDS_VIEWS = ((STREAK_VIEWS_BELOW, "none"), (256, "mild"), (128, "moderate"), (0, "severe"))


def noise_severity(sigma_hu: float) -> str:
    """Severity class of a noise standard deviation in HU (:data:`NOISE_BANDS_HU`): none/mild/moderate/severe."""
    return next(name for bound, name in NOISE_BANDS_HU if sigma_hu < bound)


def streak_severity(n_views: int) -> str:
    """Severity class of sparse-view streaks at ``n_views`` of 1024 views (:data:`STREAK_BANDS_VIEWS`)."""
    return next(name for bound, name in STREAK_BANDS_VIEWS if n_views >= bound)


# ------------------------------------------------------------------------------------------------------- terms
NOISE_TERMS = ("noise", "noisy", "noisier", "noisiness", "grain", "grainy", "graininess", "mottle", "mottled",
               "mottling", "speckle", "speckled", "quantum")
STREAK_TERMS = ("streak", "streaks", "streaking", "streaky", "streak-like", "aliasing", "undersampling",
                "sparse-view", "spoke", "spokes")
#: Two-word streak terms (matched on consecutive tokens).
STREAK_PHRASES = (("line", "artifact"), ("line", "artifacts"), ("linear", "artifact"), ("linear", "artifacts"),
                  ("view", "aliasing"), ("radial", "lines"), ("radial", "artifacts"))
#: Artifacts that neither LDCTIQA nor the simulator make (their claims are "unverified"): name -> token regex.
OTHER_ARTIFACTS: dict[str, str] = {
    "ring": r"rings?|ring-like|ringing",
    "motion": r"motion|movement|breathing|respiratory",
    "metal": r"metal|metallic|prosthes[ie]s|prosthetic|implants?|clips?",
    "beam_hardening": r"beam-hardening|cupping|photon-starvation",
}
#: Two-word forms of the other artifacts, joined to one token before reading ("beam hardening").
ARTIFACT_COMPOUNDS = (("beam", "hardening"), ("photon", "starvation"))
#: The head noun of an artifact list ("no ring or motion artifacts"); negated alone it means "no artifacts".
ARTIFACT_NOUNS = ("artifact", "artifacts", "artefact", "artefacts")

SEVERITY_TERMS: dict[str, tuple[str, ...]] = {
    "severe": ("severe", "severely", "heavy", "heavily", "dense", "densely", "strong", "strongly", "pronounced",
               "marked", "markedly", "prominent", "substantial", "substantially", "extensive", "considerable",
               "considerably", "coarse", "intense", "gross", "grossly", "excessive", "high", "extreme",
               "overwhelming", "dominant", "dominates", "dominating"),
    "moderate": ("moderate", "moderately", "medium", "intermediate", "appreciable", "significant",
                 "significantly"),
    "mild": ("mild", "mildly", "slight", "slightly", "faint", "faintly", "subtle", "subtly", "thin", "minor",
             "light", "few", "trace", "barely", "somewhat", "bit"),
}
#: Noise words meaning "no more than routine noise" (class none / claim "absent"); for streaks they mean mild.
NOISE_LOW_TERMS = ("minimal", "minimally", "low", "negligible", "little", "acceptable")
#: "not <word>" after a topic term ("streaks are not prominent", "noise is not significant") -> mild.
NOT_SALIENT = ("prominent", "significant", "pronounced", "marked", "substantial", "severe", "excessive",
               "obvious", "conspicuous", "strong", "heavy", "dense", "intrusive", "bothersome", "disturbing",
               "limiting", "distracting", "high")

#: Negation cues before a term ("no", "without", ...). "free" and "absence" take an "of" that is skipped.
NEGATIONS = ("no", "not", "without", "free", "absence", "lack", "lacks", "lacking", "nor", "neither", "never", "n't",
             "cannot", "nothing", "rather", "excluding")
#: After a term, these mean absent: "streaks are absent", "noise: none", "streaks were not seen".
ABSENT_AFTER = ("absent", "none", "nil", "no", "negative", "excluded")
#: Participles that follow "not" after a term and mean absent ("streaks are not seen").
NOT_SEEN = ("seen", "present", "visible", "evident", "identified", "appreciated", "detected", "observed", "noted",
            "apparent", "demonstrated", "discernible", "perceptible", "appreciable", "a", "an", "shown",
            "found", "recognized", "recognised", "noticeable")
#: Mentions that are questions, not claims: "assess noise and streaks", "whether streaks are present".
NON_ASSERTIVE = ("whether", "if", "assess", "assessing", "assessed", "evaluate", "evaluating", "check", "checking",
                 "look", "looking", "examine", "examining", "such", "e.g", "regarding", "search", "searching")
#: Hedges ("possible mild streaking"): read as assertions of what they hedge (a hedged streak claim where none
#: is measured still misleads the reader); listed for documentation and tests.
HEDGES = ("possible", "possibly", "probable", "probably", "may", "might", "could", "questionable", "suspected",
          "suggestion", "suspicious", "likely", "perhaps", "apparent")

#: Counted per rationale in the dataset audit (datasets_builder.checks): topic name -> pattern on the text.
AUDIT_TERMS: dict[str, re.Pattern[str]] = {
    "noise": re.compile(r"\b(?:nois(?:e|y|ier)|grain(?:y|iness)?|mottl(?:e|ed|ing))\b", re.IGNORECASE),
    "streak": re.compile(r"\bstreak(?:s|ing|y)?\b", re.IGNORECASE),
    "metal": re.compile(r"\b(?:metal(?:lic)?|prosthe\w*|implant\w*|surgical clips?)\b", re.IGNORECASE),
    "ring": re.compile(r"\bring(?:s|[- ]like)?\b", re.IGNORECASE),
    "motion": re.compile(r"\b(?:motion|movement|respiratory artifacts?|breathing)\b", re.IGNORECASE),
    "beam_hardening": re.compile(r"\b(?:beam[- ]hardening|cupping|photon starvation)\b", re.IGNORECASE),
    "blur": re.compile(r"\b(?:blur(?:s|red|ring|ry)?|unsharp|smear\w*)\b", re.IGNORECASE),
}

#: Negation in front of a phrase, within ~4 words (for regex checks of the audit: "no severe streaks").
NEGATION_BEFORE = re.compile(
    r"\b(?:no|not|without|free of|absence of|absent|lack of|rather than|nor|never|neither)\b(?:\W+\w+){0,3}\W*$",
    flags=re.IGNORECASE)
