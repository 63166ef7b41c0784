"""Explanation check for simulated data: does a rationale name the degradation that was applied, and how bad it is?

On simulated data the truth is known per image (``dose_fraction``, ``n_views`` from ``degradations.json``), so a
rationale can be checked against it with a small, transparent keyword rubric (no model involved):

* **Applied degradations** (the simulator's ladder runs from (dose 1.0, 1024 views) to (0.1, 64); design.md §4).
  Quantum noise grows with the total dose, ``sigma = 9 HU / sqrt(dose_fraction * n_views / 1024)``
  (:func:`ctiqa.simulation.expected_noise_hu`; ``noise_sigma_hu`` when the row has it): noise counts as applied
  from :data:`NOISE_APPLIED_HU` (17 HU, about twice the full-dose noise); streaks when ``n_views < 512``.
* **Expected severity** of each applied degradation: noise ``mild`` below 32 HU, ``moderate`` below 60 HU, else
  ``severe``; streaks ``mild`` for views >= 256, ``moderate`` for >= 128, else ``severe``. These are the
  log-evenly spaced bands of the offline template teacher (:class:`datasets_builder.teachers.TemplateTeacher`),
  so rubric and offline teacher agree by construction; for a real teacher they are a judgement call, stated here.
* **Named**: a term of the degradation's vocabulary (:data:`NOISE_TERMS`, :data:`STREAK_TERMS`) appears in a clause
  (text split at ``. ; , \\n`` and "but") that holds no negation (:data:`NEGATIONS`: "no streaks", "streaks are
  absent" do not count).
* **Stated severity**: the most severe class (:data:`SEVERITY_TERMS`) among the words of the clauses that name the
  degradation; ``unstated`` when none.
* **False streaks**: streaks named although none were applied (artifacts the data never had).

A second check needs no truth and applies to any data (real LDCTIQA included): :func:`quality_consistency` asks
whether the overall quality a rationale states ("overall quality is fair") agrees with the score the model gave
(:func:`stated_quality`; LDCTIQA scale anchors 0 bad ... 4 excellent).

Rates (over the rows where each applies): ``noise_named_rate``, ``streaks_named_rate``, ``degradation_named_rate``
(all applied degradations named), ``severity_match_rate`` (per applied degradation: stated == expected),
``false_streak_rate``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ctiqa.scale import QUALITY_LABELS

NOISE_APPLIED_HU = 17.0
STREAK_VIEWS_BELOW = 512
NOISE_BANDS_HU = ((32.0, "mild"), (60.0, "moderate"), (float("inf"), "severe"))  # sigma < bound -> class
STREAK_BANDS = ((256, "mild"), (128, "moderate"), (0, "severe"))  # n_views >= bound -> class

NOISE_TERMS = ("noise", "noisy", "grain", "grainy", "graininess", "mottle", "mottled", "mottling", "speckle",
               "quantum")
STREAK_TERMS = ("streak", "streaks", "streaking", "streaky", "line artifact", "line artifacts", "linear artifact",
                "linear artifacts", "aliasing", "undersampling", "sparse-view", "view aliasing")
NEGATIONS = ("no", "not", "without", "absent", "free of", "none", "lack", "lacks", "lacking", "nor")
SEVERITY_TERMS = {
    "severe": ("severe", "severely", "heavy", "heavily", "dense", "strong", "strongly", "pronounced", "marked",
               "markedly", "prominent", "substantial", "extensive", "considerable", "coarse", "intense", "gross"),
    "moderate": ("moderate", "moderately", "medium", "intermediate", "appreciable"),
    "mild": ("mild", "mildly", "slight", "slightly", "minimal", "minor", "faint", "subtle", "little",
             "fine", "light"),
}
_ORDER = ("mild", "moderate", "severe")
_CLAUSE = re.compile(r"[.;,\n]+|\bbut\b|\bwhile\b|\bwhereas\b", re.IGNORECASE)


def _has(clause: str, terms: Iterable[str]) -> bool:
    return any(re.search(rf"\b{re.escape(t)}\b", clause) for t in terms)


def check_rationale(text: str, dose_fraction: float, n_views: int,
                    noise_sigma_hu: float | None = None) -> dict[str, Any]:
    """Apply the rubric to one rationale.

    Args:
        text: the rationale (any text; a score line is harmless). dose_fraction: tube-current fraction (0-1].
        n_views: projection views kept out of 1024. noise_sigma_hu: the level's quantum noise in HU when known,
            else :func:`ctiqa.simulation.expected_noise_hu` of (dose_fraction, n_views).
    Returns:
        dict: ``noise_sigma_hu``, ``noise_applied``, ``streaks_applied`` (bool), ``noise_named``, ``streaks_named`` (bool),
        ``noise_expected`` / ``streaks_expected`` and ``noise_stated`` / ``streaks_stated`` (severity class or
        None when not applied; stated may be ``unstated``).
    """
    if noise_sigma_hu is None:
        from ctiqa.simulation import expected_noise_hu

        noise_sigma_hu = expected_noise_hu(dose_fraction, n_views)
    clauses = [c.strip().lower() for c in _CLAUSE.split(text or "") if c.strip()]
    out: dict[str, Any] = {"noise_sigma_hu": round(float(noise_sigma_hu), 2),
                           "noise_applied": noise_sigma_hu >= NOISE_APPLIED_HU,
                           "streaks_applied": n_views < STREAK_VIEWS_BELOW}
    expected = {"noise": next(name for bound, name in NOISE_BANDS_HU if noise_sigma_hu < bound),
                "streaks": next(name for bound, name in STREAK_BANDS if n_views >= bound)}
    for kind, terms in (("noise", NOISE_TERMS), ("streaks", STREAK_TERMS)):
        naming = [c for c in clauses if _has(c, terms) and not _has(c, NEGATIONS)]
        out[f"{kind}_named"] = bool(naming)
        stated = [s for s in _ORDER if any(_has(c, SEVERITY_TERMS[s]) for c in naming)]
        applied = out[f"{kind}_applied"]
        out[f"{kind}_expected"] = expected[kind] if applied else None
        out[f"{kind}_stated"] = (stated[-1] if stated else "unstated") if applied else None
    return out


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def explanation_rates(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`check_rationale` results into rates (None where no row applies; never NaN)."""
    noise = [c for c in checks if c["noise_applied"]]
    streak = [c for c in checks if c["streaks_applied"]]
    degraded = [c for c in checks if c["noise_applied"] or c["streaks_applied"]]
    severity = [c[f"{k}_stated"] == c[f"{k}_expected"] for c in checks for k in ("noise", "streaks")
                if c[f"{k}_applied"]]
    return {
        "n_checked": len(checks),
        "noise_named_rate": _rate([c["noise_named"] for c in noise]),
        "streaks_named_rate": _rate([c["streaks_named"] for c in streak]),
        "degradation_named_rate": _rate([
            (c["noise_named"] or not c["noise_applied"]) and (c["streaks_named"] or not c["streaks_applied"])
            for c in degraded]),
        "severity_match_rate": _rate(severity),
        "false_streak_rate": _rate([c["streaks_named"] for c in checks if not c["streaks_applied"]]),
        "n_noise_applied": len(noise), "n_streaks_applied": len(streak), "n_degraded": len(degraded),
        "rubric": f"ctiqa.explanations keyword rubric: noise from {NOISE_APPLIED_HU:g} HU, streaks below "
                  f"{STREAK_VIEWS_BELOW} views",
    }


# ------------------------------------------------------------------------------ rationale-score consistency
#: Overall-quality labels and their anchor on the 0-4 scale: ctiqa.scale.QUALITY_LABELS.
_LABEL = "|".join(sorted((re.escape(k) for k in QUALITY_LABELS), key=len, reverse=True))
# "good overall image quality", "poor diagnostic quality" / "quality is good", "quality remains only fair"
_QUALITY_STATEMENT = re.compile(
    rf"\b(?P<neg1>not\s+|n't\s+)?(?P<a>{_LABEL})\s+(?:(?:overall|diagnostic|image|technical)\s+)*quality\b"
    rf"|\bquality\s+(?:is|was|remains|appears|seems)\s+(?P<neg2>not\s+)?(?:(?:only|overall|still|very|quite|"
    rf"rather|generally|largely|mostly)\s+)*(?P<b>{_LABEL})\b",
    re.IGNORECASE)


def stated_quality(text: str) -> int | None:
    """The overall quality a rationale states, as its scale anchor 0-4; None when it states none.

    Looks for "<label> [overall/diagnostic/image] quality" or "quality is [only/overall...] <label>" with a label
    of :data:`QUALITY_LABELS`; a negated statement ("not good quality", "quality is not good") does not count. When
    several are stated the last wins (rationales conclude). Words elsewhere ("good contrast") are not read.
    """
    found = None
    for m in _QUALITY_STATEMENT.finditer(text or ""):
        if m.group("neg1") or m.group("neg2"):
            continue
        found = QUALITY_LABELS[(m.group("a") or m.group("b")).lower()]
    return found


def quality_consistency(checks: list[tuple[float | None, str | None]]) -> dict[str, Any]:
    """Does the rationale's stated overall quality agree with the model's own score? (no reference needed)

    A stated label agrees with a score ``s`` when it is one of the two scale anchors that bracket it,
    ``|s - anchor| < 1`` (so 2.6 agrees with "fair" and "good", 1.0 only with "poor"). This checks that the
    explanation is coherent with the score it explains, not that either is right; it applies to any data,
    real LDCTIQA included.

    Args:
        checks: (parsed score or None, generated text or None) per row.
    Returns:
        ``n_rationales`` (rows with a parsed score and a text), ``n_stated`` (of those, rows stating an overall
        quality), ``stated_rate``, ``consistent_rate`` (over the stated rows; None when none).
    """
    pairs = [(s, t) for s, t in checks if s is not None and t]
    stated = [(s, q) for s, t in pairs if (q := stated_quality(t)) is not None]
    return {
        "n_rationales": len(pairs),
        "n_stated": len(stated),
        "stated_rate": len(stated) / len(pairs) if pairs else None,
        "consistent_rate": _rate([abs(s - q) < 1 for s, q in stated]),
        "rule": "stated overall-quality label within 1 of the parsed score (ctiqa.explanations)",
    }
