"""Reward functions for GRPO (``recipes/grpo.py``): close scores, the answer format, and rationales true to the image.

Every reward here is a small pure function in TRL's reward-function shape: ``f(completions, **columns) -> list``,
one float per completion (``None`` only where a reward does not apply). ``completions`` are what TRL's
``GRPOTrainer`` passes (conversational ``[{"role": "assistant", "content": "Score: 2.2\\nReasoning: ..."}]`` or
plain strings); the other arguments are dataset columns, one value per completion (TRL repeats each row's columns
for its generations). Weights are not set here: they are ``GRPOConfig.reward_weights`` in the recipe YAML, and TRL
logs each reward per step as ``rewards/<function name>/mean`` (TensorBoard), so a run shows which one moves.

* :func:`score_reward`: ``exp(-|parsed - score| / tau)`` in (0, 1]; 0 when the strict parse fails. The score is
  read by the strict rule only (``ctiqa.scoring``: ``Score: x.x`` on the first line, or the last line for the
  rationale-first format), so a score buried in prose earns nothing. ``tau`` 0.3 as Q-Hawkeye's continuous reward
  (design notes §6): |Δ| 0.3 gives 0.37, 0.6 gives 0.14.
* :func:`format_reward`: 0 for the trained format (a strict score line and a non-empty ``Reasoning:`` line), a
  penalty otherwise: :data:`FORMAT_NO_REASONING` (score but no reasoning) or :data:`FORMAT_UNPARSEABLE` (no strict
  score line).
* :func:`faithfulness_reward`: the rationale's claims (``ctiqa.explanations.extract_claims``) against the reference
  findings of that image (columns ``noise_severity``, ``streaks`` and optionally ``streak_severity``: the measured
  findings of ``ctiqa.findings``, or the simulator's truth; ``recipes/grpo.py`` fills them). See the function for
  the table. In [-1, 1] before the unverifiable-artifact cost.
* :func:`ranking_reward`: across the whole batch, the fraction of pairs with another image whose order the parsed
  scores get right (VisualQuality-R1's idea; design notes §6). In [0, 1]; 0 when the strict parse fails.

Severity classes are ordered ``none < mild < moderate < severe`` (``ctiqa.vocabulary.SEVERITIES``); the bands that
turn HU or view counts into classes live there too (shared with the findings, the rubric and the template teacher).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ctiqa.scoring import parse_score_detailed
from ctiqa.vocabulary import SEVERITIES

#: Strict parse rules of :mod:`ctiqa.scoring` (the trained formats); any other rule is not the trained format.
STRICT_RULES = ("strict-first", "strict-last")
#: Default temperature of :func:`score_reward` in score units (0-4 scale); Q-Hawkeye uses 0.30.
SCORE_TAU = 0.3
#: :func:`format_reward` values.
FORMAT_OK = 0.0
FORMAT_NO_REASONING = -0.5
FORMAT_UNPARSEABLE = -1.0
#: :func:`faithfulness_reward`: cost of staying silent about a degradation the reference finds, and of each
#: artifact claim no measurement can check (ring, motion, metal, beam hardening: "unverified", not wrong).
SILENCE_COST = 0.25
UNVERIFIED_COST = 0.25
#: :func:`faithfulness_reward`: credit for naming a present degradation without a severity.
PRESENT_CREDIT = 0.5


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or a list of messages (the last one's ``content``, which is a
    string or a list of ``{"type": "text", "text": ...}`` blocks). ``None`` gives ``""``."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    content = completion[-1].get("content") if completion else ""
    if isinstance(content, list):
        return "".join(b.get("text") or "" for b in content if isinstance(b, dict) and b.get("type") == "text")
    return content or ""


def strict_score(text: str) -> float | None:
    """The score of ``text`` by the strict rule of :mod:`ctiqa.scoring` (a ``Score: x.x`` first or last line), in
    [0, 4]; None when the answer is not in a trained format or the score is out of range."""
    parsed = parse_score_detailed(text)
    return parsed.value if parsed.rule in STRICT_RULES else None


def _severity_index(value: Any) -> int:
    """Index in :data:`SEVERITIES` of a reference severity; anything that is not mild/moderate/severe (``none``,
    ``minimal``, ``low``, None, "") is 0: no degradation to speak of."""
    v = str(value or "").strip().lower()
    return SEVERITIES.index(v) if v in SEVERITIES[1:] else 0


def _band_agreement(claimed: int, reference: int) -> float:
    """1 for the reference band, 0 one band off, -1 two or more bands off."""
    return max(-1.0, 1.0 - abs(claimed - reference))


# --------------------------------------------------------------------------------------------------- rewards
def score_reward(completions: Sequence[Any], score: Sequence[float], *, tau: float = SCORE_TAU,
                 **_: Any) -> list[float]:
    """Score accuracy: ``exp(-|strict parsed score - score| / tau)``, 0 when the strict parse fails.

    Args:
        completions: TRL completions (see the module docstring). score: the true score per completion (0-4).
        tau: temperature in score units (> 0); default :data:`SCORE_TAU`.
    Returns:
        one float in [0, 1] per completion (1 for an exact score).
    Raises:
        ValueError: ``tau`` not positive.
    """
    if not tau > 0:
        raise ValueError(f"score reward: tau must be > 0, got {tau!r}")
    out = []
    for c, s in zip(completions, score, strict=True):
        p = strict_score(completion_text(c))
        out.append(0.0 if p is None else math.exp(-abs(p - float(s)) / tau))
    return out


def format_reward(completions: Sequence[Any], *, penalty_unparseable: float = FORMAT_UNPARSEABLE,
                  penalty_no_reasoning: float = FORMAT_NO_REASONING, **_: Any) -> list[float]:
    """Format: :data:`FORMAT_OK` (0) for a strict score line plus a non-empty ``Reasoning:`` line, else a penalty.

    Args:
        completions: TRL completions. penalty_unparseable: value when the strict parse fails (default -1).
        penalty_no_reasoning: value when the score parses but no non-empty ``Reasoning:`` line follows or precedes
            it (default -0.5).
    Returns:
        one float per completion.
    """
    out = []
    for c in completions:
        text = completion_text(c)
        if strict_score(text) is None:
            out.append(penalty_unparseable)
            continue
        has_reasoning = any(line.strip().lower().startswith("reasoning:") and line.split(":", 1)[1].strip()
                            for line in text.splitlines())
        out.append(FORMAT_OK if has_reasoning else penalty_no_reasoning)
    return out


def claim_agreement(claim: str | None, reference: int, *, severity_known: bool = True,
                    none_reads_mild: bool = False, silence_cost: float = SILENCE_COST,
                    present_credit: float = PRESENT_CREDIT, false_claim_cost: float = 1.0) -> float:
    """Agreement of one claim about one degradation with the reference (pure; the table of
    :func:`faithfulness_reward`).

    Args:
        claim: ``extract_claims`` value: None (not mentioned), ``absent``, ``present``, ``mild``, ``moderate``,
            ``severe``.
        reference: index in :data:`SEVERITIES` (0 none ... 3 severe).
        severity_known: False when the reference only says present/absent (a measured streak call has no
            severity): then any presence claim agrees fully with a present reference.
        none_reads_mild: True for noise: every CT image has some noise, so with reference ``none`` (minimal) a
            claim of "mild" agrees, "moderate" is one band off, "severe" two, "present" earns ``present_credit``.
        false_claim_cost: what naming a degradation the reference does not find costs (default 1; more than 1
            makes a false claim worse than a missed one, for a model that cannot tell and would otherwise name the
            majority class everywhere).
    Returns:
        a float in [-max(1, false_claim_cost), 1].
    """
    if claim is None:
        return -silence_cost if reference > 0 else 0.0
    if claim == "absent":
        return 1.0 if reference == 0 else -1.0
    if reference == 0:
        if not none_reads_mild:
            return -false_claim_cost
        return present_credit if claim == "present" else _band_agreement(SEVERITIES.index(claim), 1)
    if claim == "present" or not severity_known:
        return present_credit if severity_known else 1.0
    return _band_agreement(SEVERITIES.index(claim), reference)


def faithfulness_reward(completions: Sequence[Any], noise_severity: Sequence[Any], streaks: Sequence[Any],
                        streak_severity: Sequence[Any] | None = None, *, silence_cost: float = SILENCE_COST,
                        unverified_cost: float = UNVERIFIED_COST, present_credit: float = PRESENT_CREDIT,
                        false_streak_cost: float = 1.0, **_: Any) -> list[float]:
    """Do the rationale's claims agree with the reference findings of its image?

    ``(noise term + streak term) / 2 - unverified_cost * (number of other artifacts claimed)``, where each term is
    :func:`claim_agreement` of the claim (``ctiqa.explanations.extract_claims``) with the reference:

    ============================  ======================  =============================================
    claim \\ reference             none (or minimal)       mild / moderate / severe
    ============================  ======================  =============================================
    not mentioned                 0                       ``-silence_cost`` (silence costs a little)
    absent                        1                       -1
    present (no severity)         streaks -1; noise       ``present_credit`` (1 when the reference has
                                  ``present_credit``      no severity, e.g. a measured streak call)
    mild / moderate / severe      streaks -1; noise: as   1 exact, 0 one band off, -1 two or more (any
                                  if the reference were   presence claim 1 when the reference has no
                                  mild (all CT has some)  severity)
    ============================  ======================  =============================================

    Args:
        completions: TRL completions.
        noise_severity: reference noise class per completion (``none``/``minimal``/None = no noise to speak of,
            ``mild``, ``moderate``, ``severe``).
        streaks: reference streak call per completion (bool).
        streak_severity: reference streak class per completion (``mild``/``moderate``/``severe``) when known (the
            simulator's truth); None (the column absent) or a None value means only present/absent is known.
        silence_cost, unverified_cost, present_credit: see :data:`SILENCE_COST`, :data:`UNVERIFIED_COST`,
            :data:`PRESENT_CREDIT`.
        false_streak_cost: the streak term for streaks claimed where the reference has none (default 1: the
            table's -1); see :func:`claim_agreement`.
    Returns:
        one float per completion, in [-(1 + max(1, false_streak_cost)) / 2 - unverified_cost * 4, 1].
    """
    from ctiqa.explanations import extract_claims

    costs = {"silence_cost": silence_cost, "present_credit": present_credit}
    n = len(completions)
    streak_severity = list(streak_severity) if streak_severity is not None else [None] * n
    out = []
    for c, noise_ref, streak_ref, streak_sev in zip(completions, noise_severity, streaks, streak_severity,
                                                    strict=True):
        claims = extract_claims(completion_text(c))
        noise = claim_agreement(claims.noise, _severity_index(noise_ref), none_reads_mild=True, **costs)
        s_ref = (_severity_index(streak_sev) or 1) if bool(streak_ref) else 0
        streak = claim_agreement(claims.streaks, s_ref, severity_known=streak_sev is not None,
                                 false_claim_cost=false_streak_cost, **costs)
        out.append((noise + streak) / 2 - unverified_cost * len(claims.other_artifacts))
    return out


def ranking_reward(completions: Sequence[Any], score: Sequence[float], **_: Any) -> list[float]:
    """Ranking across the batch: for each completion, the fraction of completions for OTHER true scores whose order
    its strict parsed score gets right (a tie in the parsed scores counts 1/2; a partner without a parsed score
    counts 0). 0 when its own strict parse fails; None when every other completion has the same true score.

    Args:
        completions: TRL completions of the whole batch. score: true score per completion.
    Returns:
        one float in [0, 1] (or None) per completion.
    """
    parsed = [strict_score(completion_text(c)) for c in completions]
    truth = [float(s) for s in score]
    out: list[float | None] = []
    for i, (p, t) in enumerate(zip(parsed, truth, strict=True)):
        others = [j for j in range(len(truth)) if j != i and truth[j] != t]
        if not others:
            out.append(None)
            continue
        if p is None:
            out.append(0.0)
            continue
        right = 0.0
        for j in others:
            q = parsed[j]
            if q is None:
                continue
            right += 0.5 if q == p else float((p - q) * (t - truth[j]) > 0)
        out.append(right / len(others))
    return out


#: The rewards a recipe can name in ``reward_funcs`` (name -> function); the name is what TensorBoard shows.
REWARDS = {f.__name__: f for f in (score_reward, format_reward, faithfulness_reward, ranking_reward)}


# ------------------------------------------------------------------------------------------ reference findings
#: Dataset columns :func:`faithfulness_reward` reads (``streak_severity`` may be None: severity unknown).
REFERENCE_COLUMNS = ("noise_severity", "streaks", "streak_severity")


def truth_reference(dose_fraction: float, n_views: int, noise_sigma_hu: float | None = None) -> dict[str, Any]:
    """Reference findings from the simulator's truth (simulated data only), in the bands of ``ctiqa.vocabulary``
    (those of the truth-based rubric and the template teacher): noise from 17 HU, streaks below 512 views.

    Args:
        dose_fraction: tube-current fraction (0, 1]. n_views: projection views kept (of 1024).
        noise_sigma_hu: the level's quantum noise in HU when known, else ``ctiqa.simulation.expected_noise_hu``.
    Returns:
        ``{"noise_severity": "none"|"mild"|"moderate"|"severe", "streaks": bool, "streak_severity": str|None}``.
    """
    from ctiqa.simulation import expected_noise_hu
    from ctiqa.vocabulary import noise_severity, streak_severity

    sigma = expected_noise_hu(dose_fraction, n_views) if noise_sigma_hu is None else float(noise_sigma_hu)
    streaks = streak_severity(int(n_views))
    return {"noise_severity": noise_severity(sigma), "streaks": streaks != "none",
            "streak_severity": None if streaks == "none" else streaks}


def measured_reference(image: Any) -> dict[str, Any]:
    """Reference findings measured on the image (any data; ``ctiqa.findings`` through
    ``ctiqa.html_report.measure``, which reads a rendered RGB image's soft-tissue channel); a measured streak call
    has no severity. An image too small to measure gives no reference (noise None, streaks False).

    Returns:
        ``{"noise_severity": str|None, "streaks": bool, "streak_severity": None}``.
    """
    from ctiqa.html_report import measure

    row = measure(image) or {}
    return {"noise_severity": row.get("noise_severity"), "streaks": bool(row.get("streaks")),
            "streak_severity": None}
