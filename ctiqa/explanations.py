"""Rationales read as claims, and checked against the truth (simulated data) or the measured findings (any data).

**Claims** (:func:`extract_claims`): what a rationale asserts about noise, sparse-view streaks and artifacts the
data never has (ring, motion, metal, beam hardening), read with transparent rules and the one vocabulary of
:mod:`ctiqa.vocabulary` (terms, negations, severity words, bands). The dataset audit
(:mod:`datasets_builder.checks`), the truth rubric and the faithfulness check all read claims this way.

**Truth rubric** (:func:`truth_rubric`, simulated data): the truth is known per image (``dose_fraction``,
``n_views``, ``noise_sigma_hu`` from ``degradations.json``):

* **Applied degradations** (the simulator's ladder runs from (dose 1.0, 1024 views) to (0.1, 64); design.md §4).
  Quantum noise grows with the total dose, ``sigma = 9 HU / sqrt(dose_fraction * n_views / 1024)``
  (:func:`ctiqa.simulation.expected_noise_hu`; ``noise_sigma_hu`` when the row has it): noise counts as applied
  from :data:`ctiqa.vocabulary.NOISE_APPLIED_HU` (17 HU, about twice the full-dose noise); streaks when
  ``n_views < 512``.
* **Expected severity** of each applied degradation: the bands of :mod:`ctiqa.vocabulary` (noise ``mild`` below
  32 HU, ``moderate`` below 60 HU, else ``severe``; streaks ``mild`` for views >= 256, ``moderate`` for >= 128,
  else ``severe``), shared with the template teacher and the measured findings.
* **Named**: the rationale's claim about the degradation is present (``present``/``mild``/``moderate``/``severe``),
  not absent or unmentioned; **stated severity**: the claim's class, ``unstated`` when named without one.
* **False streaks**: streaks named although none were applied (artifacts the data never had).

Rates (over the rows where each applies): ``noise_named_rate``, ``streaks_named_rate``, ``degradation_named_rate``
(all applied degradations named), ``severity_match_rate`` (per applied degradation: stated == expected),
``false_streak_rate``.

A second check needs no truth and applies to any data (real LDCTIQA included): :func:`quality_consistency` asks
whether the overall quality a rationale states ("overall quality is fair") agrees with the score the model gave
(:func:`stated_quality`; LDCTIQA scale anchors 0 bad ... 4 excellent).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ctiqa import vocabulary as V
from ctiqa.findings import (
    STREAK_CALL_VALIDATED,  # one home; while False streak agreement is marked unvalidated
)
from ctiqa.scale import QUALITY_LABELS
from ctiqa.vocabulary import CLAIM_RANK, NOISE_APPLIED_HU, STREAK_VIEWS_BELOW, noise_severity, streak_severity

# ------------------------------------------------------------------------------------------- reading claims
_TOKEN = re.compile(r"n't|[a-z0-9]+(?:[-'][a-z0-9]+)*|[.;!?\n,():/]")
_HARD = {".", ";", "!", "?", "\n", "but", "however", "although", "though", "whereas", "while", "yet", "except",
         "apart", "aside", "otherwise", "besides"}
_SOFT = {",", "and", "with", "(", ")", "/", "which", "that", "as"}
_LIST = {",", "or", "and", "nor", "/", "any", "other", "obvious", "significant", "visible", "appreciable",
         "evident", "discernible", "definite", "major", "relevant", "apparent"}
_SKIP_AFTER = {"is", "are", "was", "were", "be", "been", "being", "appear", "appears", "appeared", "seem", "seems",
               "remain", "remains", "to", "entirely", "completely", "essentially", "largely", "clearly", "definitely",
               "totally", "also", "again", ":", "(", ")", "really", "readily", "quite", "basically", "virtually",
               "present", "visible", "seen", "there", "here", "in", "this", "image", "slice", "overall"}
_INTENSIFIERS = {"very", "particularly", "especially", "overly", "too", "that", "highly", "excessively"}
_OTHER = {name: re.compile(rf"(?:{rx})") for name, rx in V.OTHER_ARTIFACTS.items()}
_SEVERITY_OF = {w: cls for cls, words in V.SEVERITY_TERMS.items() for w in words}
_MAX_FILLER = 5       # non-list tokens allowed between a negation cue and its term ("no evidence of significant")
_MAX_ATTACH = 8       # token distance (+4 per soft boundary crossed) within which a severity word attaches


@dataclass(frozen=True)
class Claims:
    """What a rationale asserts about the image (:func:`extract_claims`).

    Attributes:
        noise: None (not mentioned) | "absent" | "present" (named, no severity) | "mild" | "moderate" | "severe".
            "absent" also covers routine-level wording ("minimal noise", "low noise"; :data:`V.NOISE_LOW_TERMS`).
        streaks: same values; "minimal streaking" is "mild".
        other_artifacts: sorted names from {"beam_hardening", "metal", "motion", "ring"} asserted as present
            (hedged included); artifacts neither LDCTIQA nor the simulator make: unverifiable, not wrong.
    """

    noise: str | None = None
    streaks: str | None = None
    other_artifacts: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["other_artifacts"] = list(self.other_artifacts)
        return d


def _tokens(text: str) -> list[str]:
    t = (text or "").lower().replace("\u2019", "'").replace("\u2018", "'").replace("artefact", "artifact")
    t = re.sub(r"\b(signal|contrast)[- ]to[- ]noise\b", r"\1-to-noise", t)
    t = re.sub(r"\b(can)not\b", "can n't", t)
    t = re.sub(r"([a-z])n't\b", r"\1 n't", t)
    toks = _TOKEN.findall(t)
    out: list[str] = []
    for tok in toks:  # join two-word artifact names ("beam hardening" -> "beam-hardening")
        if out and (out[-1], tok) in V.ARTIFACT_COMPOUNDS:
            out[-1] = f"{out[-1]}-{tok}"
        else:
            out.append(tok)
    # "Streaks? None." -> "Streaks: None."
    return [":" if tok == "?" and i and _topic(out[i - 1]) else tok for i, tok in enumerate(out)]


def _topic(tok: str, prev: str | None = None) -> str | None:
    """Topic of one token: noise, streaks, an other-artifact name, "artifacts" (generic) or None."""
    if tok in V.NOISE_TERMS:
        return "noise"
    if tok in V.STREAK_TERMS or (prev, tok) in V.STREAK_PHRASES:
        return "streaks"
    for name, rx in _OTHER.items():
        if rx.fullmatch(tok):
            return name
    if tok in V.ARTIFACT_NOUNS:
        return "artifacts"
    if tok.endswith("-free"):
        return _topic(tok[:-5]) or ("artifacts" if tok[:-5] in ("artifact", "artifacts") else None)
    return None


def _segments(toks: list[str]) -> list[list[str]]:
    segs: list[list[str]] = [[]]
    for tok in toks:
        if tok in _HARD:
            segs.append([tok] if tok == "but" else [])
        else:
            segs[-1].append(tok)
    return [s for s in segs if s]


def _negated_before(seg: list[str], j: int, topics: list[str | None]) -> bool:
    filler, crossed = 0, False
    for k in range(j - 1, -1, -1):
        tok = seg[k]
        if tok in V.NEGATIONS:
            return True
        if tok in _HARD:
            return False
        is_list = tok in _LIST or (topics[k] is not None and topics[k] != "artifacts")
        if topics[k] == "artifacts" and crossed:
            return False  # "no ring artifacts, and noise is ...": the negated list ended at its head noun
        if tok in _SOFT:
            if filler:
                return False
            crossed = True
            continue
        if is_list or topics[k] == "artifacts":
            continue
        if crossed or tok in _SEVERITY_OF or filler >= _MAX_FILLER:
            return False
        filler += 1
    return False


def _after(seg: list[str], j: int, topics: list[str | None]) -> str | None:
    """Polarity stated after the term: "absent" ("streaks are absent", "noise: none"), "mild" ("not prominent")."""
    k = j + 1
    while k < len(seg):
        tok = seg[k]
        if tok in V.ABSENT_AFTER:
            return "absent"
        if tok in ("not", "n't"):
            rest = [t for t in seg[k + 1:k + 4] if t not in _SKIP_AFTER and t not in ("be", "really")]
            rest = [t for t in rest if t not in _INTENSIFIERS]
            if rest and rest[0] in V.NOT_SALIENT:
                return "mild"
            if rest and rest[0] in V.NOT_SEEN or (seg[k + 1:k + 2] and seg[k + 1] in V.NOT_SEEN):
                return "absent"
            return None
        if tok in _SKIP_AFTER or tok in _LIST or (topics[k] is not None):
            k += 1
            continue
        return None
    return None


def _non_assertive(seg: list[str], j: int) -> bool:
    for k in range(j - 1, max(-1, j - 7), -1):
        if seg[k] in V.NON_ASSERTIVE:
            return True
        if seg[k] in V.NEGATIONS:
            return False
    return False


def extract_claims(text: str | None) -> Claims:
    """Read what a rationale claims about noise, streaks and other artifacts (transparent rules, no model).

    Rules (vocabulary in :mod:`ctiqa.vocabulary`; tested on teacher reports, chatty zero-shot answers and the
    fine-tuned model's short output in tests/test_claims.py):

    * The text is split into sentences at ``. ; ! ? newline`` and contrast words ("but", "however", "while",
      "although", "except"...); commas, "and", "with" are soft boundaries inside a sentence.
    * A term is **negated** by a cue before it in its sentence ("no", "not", "without", "free of", "absence of",
      "neither/nor", "n't": "I don't see any streaks"), with at most 5 other words between ("no evidence of
      significant streaks"); a cue reaches over a list of artifact names ("no ring, motion or metal artifacts"),
      not over another clause ("no streaks, moderate noise"). After the term, "absent", "none", "not seen/present/
      visible..." negate it ("Streaks? None.", "streak artifacts are not seen"); "not prominent/significant/
      pronounced..." make it ``mild`` ("streaks are not prominent"). A negated generic "artifacts" ("no
      artifacts", "artifact-free") means streaks ``absent`` unless streaks are named elsewhere.
    * A severity word (:data:`V.SEVERITY_TERMS`) attaches to the nearest term of its sentence (at most 8 tokens,
      soft boundaries cost 4); a contrast clause without a term of its own ("noise is present but faint") passes
      its words to the previous sentence's last term. For noise, routine-level words ("minimal", "low",
      "negligible") mean ``absent``; for streaks ``mild``.
    * Several mentions of one topic: the most severe asserted one wins; an asserted mention without a severity
      gives ``present``; only negated mentions give ``absent``.
    * **Hedges** ("possible mild streaking", "may be subtle streaks") count as assertions at the stated
      severity: a hedged streak claim where none is measured still misleads the reader.
    * Mentions after "assess", "whether", "look for", "such as"... (:data:`V.NON_ASSERTIVE`) are not claims.

    Args:
        text: any text (rationale, chat answer; None or "" -> nothing claimed).
    Returns:
        :class:`Claims`.
    """
    present: dict[str, list[int]] = {}   # topic -> ranks of asserted mentions (-1: no severity)
    negated: set[str] = set()
    last: tuple[str, list[int]] | None = None   # (topic, its rank list) of the previous segment's last mention
    for seg in _segments(_tokens(text or "")):
        topics = [_topic(t, seg[i - 1] if i else None) for i, t in enumerate(seg)]
        mentions = [i for i, tp in enumerate(topics) if tp is not None]
        if not mentions:
            if seg[0] == "but" and last is not None:  # "Noise is present but not prominent / but faint"
                _carry_over(seg, last)
            continue
        sev = _attach_severities(seg, topics, mentions)
        for j in mentions:
            tp = topics[j]
            assert tp is not None
            if tp == "artifacts" and j and topics[j - 1] not in (None, "artifacts"):
                continue  # the head noun of "ring or motion artifacts", not a generic "artifacts"
            free = seg[j].endswith("-free")
            after = _after(seg, j, topics)
            if free or after == "absent" or _negated_before(seg, j, topics):
                negated.add(tp)
                continue
            if tp == "artifacts":
                continue
            ranks = [_rank(tp, w) for w in sev.get(j, [])]
            if after == "mild":
                ranks = [CLAIM_RANK["mild"]]
            if not ranks and _non_assertive(seg, j):
                continue
            present.setdefault(tp, []).append(max(ranks) if ranks else -1)
            last = (tp, present[tp])
    names = {v: k for k, v in CLAIM_RANK.items()}

    def claim(tp: str) -> str | None:
        if tp in present:
            best = max(present[tp])
            return names[best] if best >= 0 else "present"
        if tp in negated or (tp == "streaks" and "artifacts" in negated):
            return "absent"
        return None

    return Claims(noise=claim("noise"), streaks=claim("streaks"),
                  other_artifacts=tuple(sorted(n for n in V.OTHER_ARTIFACTS if n in present)))


def _rank(topic: str, word: str) -> int:
    if word in V.NOISE_LOW_TERMS:
        return CLAIM_RANK["absent"] if topic == "noise" else CLAIM_RANK["mild"]
    return CLAIM_RANK[_SEVERITY_OF[word]]


def _is_severity(seg: list[str], i: int) -> bool:
    tok = seg[i]
    if tok not in _SEVERITY_OF and tok not in V.NOISE_LOW_TERMS:
        return False
    before = [t for t in seg[max(0, i - 2):i] if t not in _INTENSIFIERS]
    return not (before and before[-1] in ("not", "n't", "no"))


def _attach_severities(seg: list[str], topics: list[str | None], mentions: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for i in range(len(seg)):
        if not _is_severity(seg, i):
            continue
        best, best_d = None, _MAX_ATTACH + 1
        for j in mentions:
            lo, hi = sorted((i, j))
            d = hi - lo + 4 * sum(1 for t in seg[lo + 1:hi] if t in _SOFT)
            if d < best_d or (d == best_d and j > i):
                best, best_d = j, d
        if best is not None:
            out.setdefault(best, []).append(seg[i])
    return out


def _carry_over(seg: list[str], last: tuple[str, list[int]]) -> None:
    topic, ranks = last
    for i, tok in enumerate(seg):
        if tok in ("not", "n't"):
            rest = [t for t in seg[i + 1:i + 4] if t not in _INTENSIFIERS and t not in _SKIP_AFTER]
            if rest and rest[0] in V.NOT_SALIENT:
                ranks[-1] = CLAIM_RANK["mild"]
                return
        elif _is_severity(seg, i):
            ranks[-1] = max(ranks[-1], _rank(topic, tok))


# ------------------------------------------------------------------------------- claims vs measured findings


def _bands_off(claim: str | None, measured: str | None) -> int | None:
    """Distance in severity bands between a noise claim and a measured class; None when either has no class."""
    if claim not in CLAIM_RANK or measured is None:
        return None
    return abs(CLAIM_RANK[claim] - V.SEVERITIES.index(measured))


def findings_check(text: str | None, findings: dict[str, Any] | None) -> dict[str, Any]:
    """Compare what a rationale claims (:func:`extract_claims`) with the measured findings of its image.

    Args:
        text: the rationale. findings: a :meth:`ctiqa.findings.Findings.to_row` dict (``noise_severity``,
            ``streaks``), or None when the image was not measured.
    Returns:
        ``claims`` (:meth:`Claims.to_dict`), ``noise_bands_off`` (0 = the claimed class is the measured one,
        "absent" = "none"; None when noise is not claimed with a class or not measured), ``noise_agrees``
        (``noise_bands_off == 0``; a claim "present" agrees with any measured class but "none"),
        ``noise_contradicts`` (two or more bands off, or "present" where "none" is measured is NOT counted),
        ``streaks_agree`` (claimed present/absent == measured call; None when not claimed or not measured),
        ``streaks_contradict`` (streaks claimed where none are measured), ``unverified`` (other artifacts
        claimed: neither LDCTIQA nor the simulator makes them; unverifiable, not wrong).
    """
    return compare_claims(extract_claims(text), findings)


def compare_claims(c: Claims, findings: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`findings_check` for claims already extracted (the one place claims meet measured findings)."""
    f = findings or {}
    measured_noise, measured_streaks = f.get("noise_severity"), f.get("streaks")
    off = _bands_off(c.noise, measured_noise)
    if c.noise == "present" and measured_noise is not None:
        noise_agrees: bool | None = measured_noise != "none"
    else:
        noise_agrees = None if off is None else off == 0
    streaks_agree = None
    if c.streaks is not None and measured_streaks is not None:
        streaks_agree = (c.streaks != "absent") == bool(measured_streaks)
    return {"claims": c.to_dict(), "noise_measured": measured_noise, "streaks_measured": measured_streaks,
            "noise_bands_off": off, "noise_agrees": noise_agrees,
            "noise_contradicts": off is not None and off >= 2,
            "streaks_agree": streaks_agree,
            "streaks_contradict": c.streaks not in (None, "absent") and measured_streaks is False,
            "unverified": list(c.other_artifacts)}


def faithfulness_flags(check: dict[str, Any]) -> list[str]:
    """Short, human-readable flags of one :func:`findings_check` verdict (empty: nothing to flag).

    ``noise claimed <claim>, measured <class>`` (two or more bands off), ``streaks claimed, none measured``
    (marked unvalidated while :data:`STREAK_CALL_VALIDATED` is False), ``unverified: <artifact>`` per artifact.
    """
    flags = []
    if check.get("noise_contradicts"):
        flags.append(f"noise claimed {check['claims']['noise']}, measured {check['noise_measured']}")
    if check.get("streaks_contradict"):
        flags.append("streaks claimed, none measured" + ("" if STREAK_CALL_VALIDATED else " (unvalidated call)"))
    flags += [f"unverified: {a.replace('_', ' ')}" for a in check.get("unverified", [])]
    return flags


def faithfulness(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """Faithfulness of rationales to the measured findings of their images, on any data (no truth needed).

    Args:
        records: dicts with ``text`` (the rationale, or None) and ``findings`` (a
            :meth:`ctiqa.findings.Findings.to_row` dict, or None). Each record with both gets the per-row verdict
            of :func:`findings_check` under ``faithfulness``.
    Returns:
        None when no record has a text; else ``n_rationales``, ``n_measured`` (with findings too),
        coverage: ``noise_addressed_rate``, ``streaks_addressed_rate`` (a claim, absent included, among the
        rationales); ``noise_agreement_rate`` (over rationales claiming noise with a class or "present"),
        ``noise_within_one_band_rate``, ``noise_contradiction_rate`` (two bands off: the audit's rejection rule);
        ``streak_agreement_rate`` (claimed present/absent == measured call, over rationales addressing streaks),
        ``streak_contradiction_rate`` (streaks claimed where none are measured, over all measured rationales),
        ``streak_call_validated`` (:data:`STREAK_CALL_VALIDATED`); ``unverified_rate`` (rationales claiming an
        artifact the data cannot have: ring, motion, metal, beam hardening) and ``unverified_counts`` per name.
        Rates are None (never NaN) when nothing applies.
    """
    texts = [r for r in records if r.get("text")]
    if not texts:
        return None
    checks = []
    for r in texts:
        if r.get("findings") is not None:
            r["faithfulness"] = findings_check(r["text"], r["findings"])
            checks.append(r["faithfulness"])
    noise = [c for c in checks if c["noise_agrees"] is not None]
    off = [c["noise_bands_off"] for c in checks if c["noise_bands_off"] is not None]
    streak = [c for c in checks if c["streaks_agree"] is not None]
    counts = Counter(a for c in checks for a in c["unverified"])
    return {
        "n_rationales": len(texts), "n_measured": len(checks),
        "noise_addressed_rate": _rate([c["claims"]["noise"] is not None for c in checks]),
        "streaks_addressed_rate": _rate([c["claims"]["streaks"] is not None for c in checks]),
        "noise_agreement_rate": _rate([c["noise_agrees"] for c in noise]),
        "noise_within_one_band_rate": _rate([o <= 1 for o in off]),
        "noise_contradiction_rate": _rate([o >= 2 for o in off]),
        "streak_agreement_rate": _rate([c["streaks_agree"] for c in streak]),
        "streak_contradiction_rate": _rate([c["streaks_contradict"] for c in checks]),
        "streak_call_validated": STREAK_CALL_VALIDATED,
        "unverified_rate": _rate([bool(c["unverified"]) for c in checks]),
        "unverified_counts": dict(sorted(counts.items())),
        "n_noise_claims": len(noise), "n_streak_claims": len(streak),
        "rule": "claims (ctiqa.explanations.extract_claims) vs measured findings (ctiqa.findings); noise bands "
                "of ctiqa.vocabulary",
    }


def measured_vs_truth(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """How often the measured-findings check and the truth rubric give the same verdict (simulated data).

    Per record with both ``faithfulness`` and ``explanation`` (truth rubric) verdicts, two verdicts are compared:
    noise (the claimed class equals the measured class vs equals the true class, "absent" = "none") and streaks
    (claimed present/absent equals the measured call vs equals the truth, streaks below 512 views).
    Returns ``n``, ``noise_agree_rate``, ``streaks_agree_rate``, ``both_agree_rate`` (None when no record has both).
    """
    pairs = [(r["faithfulness"], r["explanation"]) for r in records
             if r.get("faithfulness") and r.get("explanation")]
    if not pairs:
        return None
    noise, streak, both = [], [], []
    for f, t in pairs:
        claim = f["claims"]["noise"]
        true_cls = noise_severity(t["noise_sigma_hu"])
        n_ok = (claim == "absent" and true_cls == "none") or claim == true_cls
        n_meas = (claim == "absent" and f["noise_measured"] == "none") or claim == f["noise_measured"]
        sc = f["claims"]["streaks"]
        s_true = None if sc is None else (sc != "absent") == t["streaks_applied"]
        s_meas = f["streaks_agree"]
        noise.append(n_ok == n_meas)
        streak.append(s_true == s_meas)
        both.append(n_ok == n_meas and s_true == s_meas)
    return {"n": len(pairs), "noise_agree_rate": _rate(noise), "streaks_agree_rate": _rate(streak),
            "both_agree_rate": _rate(both)}


# ------------------------------------------------------------------------------------ truth rubric (simulated)
def truth_rubric(text: str, dose_fraction: float, n_views: int,
                 noise_sigma_hu: float | None = None) -> dict[str, Any]:
    """Check one rationale against the simulator's truth (the rubric of the module docstring).

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
    claims = extract_claims(text)
    out: dict[str, Any] = {"noise_sigma_hu": round(float(noise_sigma_hu), 2),
                           "noise_applied": noise_sigma_hu >= NOISE_APPLIED_HU,
                           "streaks_applied": n_views < STREAK_VIEWS_BELOW}
    expected = {"noise": noise_severity(noise_sigma_hu), "streaks": streak_severity(n_views)}
    for kind in ("noise", "streaks"):
        claim = getattr(claims, kind)
        out[f"{kind}_named"] = claim not in (None, "absent")
        applied = out[f"{kind}_applied"]
        out[f"{kind}_expected"] = expected[kind] if applied else None
        stated = claim if claim in ("mild", "moderate", "severe") else "unstated"
        out[f"{kind}_stated"] = stated if applied else None
    return out


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def explanation_rates(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`truth_rubric` results into rates (None where no row applies; never NaN)."""
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


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One plain-text line per rationale check present in a ``results.json`` dict, for the console
    (``ctiqa evaluate``) and the HTML report alike: the truth rubric (``explanation_check``, simulated data), the
    faithfulness to measured findings (``faithfulness``) and the rationale-score consistency
    (``rationale_consistency``). Rates print with two decimals, "n/a" when nothing applied."""
    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    out = []
    ex = results.get("explanation_check")
    if ex:
        out.append(f"explanation check on simulated truth ({ex['n_checked']} rationales): degradation named "
                   f"{fmt(ex.get('degradation_named_rate'))}, severity matches {fmt(ex.get('severity_match_rate'))}, "
                   f"false streaks {fmt(ex.get('false_streak_rate'))}")
    fa = results.get("faithfulness")
    if fa and fa.get("n_measured"):
        out.append(f"faithfulness to measured findings ({fa['n_measured']} rationales): noise addressed "
                   f"{fmt(fa.get('noise_addressed_rate'))}, agrees {fmt(fa.get('noise_agreement_rate'))}; streaks "
                   f"addressed {fmt(fa.get('streaks_addressed_rate'))}, agree {fmt(fa.get('streak_agreement_rate'))}"
                   f"{'' if fa.get('streak_call_validated') else ' (streak call unvalidated)'}; unverified "
                   f"artifacts {fmt(fa.get('unverified_rate'))}")
    rc = results.get("rationale_consistency")
    if rc and rc.get("n_rationales"):
        out.append(f"rationale-score consistency ({rc['n_rationales']} rationales): overall quality stated "
                   f"{fmt(rc.get('stated_rate'))}, agrees with the parsed score {fmt(rc.get('consistent_rate'))}")
    return out
