"""Grounded teacher: the audit against measured findings, paper-style rationales, re-asking with the reason, and
findings columns in built datasets (template teacher and fake Gemini)."""

import json
import re

import pytest
from datasets import load_dataset
from test_datasets_builder import gemini_teacher, make_ldctiqa, read_audit

from ctiqa import prompts
from ctiqa.explanations import extract_claims, truth_rubric
from ctiqa.testing.fake_gemini import FakeGemini, answer
from datasets_builder import checks
from datasets_builder.build import BuildOptions, EmptySplitError, build_dataset

MILD_NO_STREAKS = {"noise_hu": 25.0, "noise_severity": "mild", "streaks": False, "streaks_source": "simulator"}
MILD_UNKNOWN = {"noise_hu": 25.0, "noise_severity": "mild", "streaks": None, "streaks_source": "unmeasured"}

# Rationales in the style of the paper's teacher (Gemini 2.5 Pro given the true score): what the audit keeps.
PAPER_STYLE = [
    # (text, grounding, kept?, reasons, flags)
    ("Of course. The provided crops reveal mild quantum mottle in the liver and prominent ring artifacts centered on "
     "the isocenter, which degrade the assessment of the pancreas and reduce confidence for small lesions.",
     MILD_NO_STREAKS, False, ["unseen_view"], ["unverified_artifact: ring"]),
    ("Mild noise is present in the soft tissue; there are no streak artifacts. Subtle beam hardening from the spine "
     "darkens the adjacent paraspinal muscles, while organ edges remain sharp and diagnostic quality is good.",
     MILD_NO_STREAKS, True, [], ["unverified_artifact: beam_hardening"]),
    ("Severe, coarse noise dominates the image and dense streaks radiate from the vertebral body across the liver, "
     "obscuring low-contrast detail and limiting the diagnostic value of the slice for small hepatic lesions.",
     MILD_NO_STREAKS, False, ["contradicts_findings"], []),
    ("Mild noise is present and faint streaks cross the posterior soft tissue; organ edges remain sharp and "
     "low-contrast structures are mostly preserved, so the slice stays diagnostic for routine questions.",
     MILD_UNKNOWN, True, [], ["unverified_streaks"]),
    ("Certainly! Image noise is mild and no ring, motion or metal artifacts are seen; the liver and vessel margins "
     "are crisp and low-contrast lesions would remain detectable at this noise level in the abdomen.",
     MILD_NO_STREAKS, True, [], []),
]


def test_audit_of_paper_style_rationales():
    for text, g, kept, reasons, flags in PAPER_STYLE:
        res = checks.check_rationale(text, 2.5, grounding=g)
        assert (res.ok, res.reasons, res.flags) == (kept, reasons, flags), (text, res.evidence)
    res = checks.check_rationale(PAPER_STYLE[2][0], 2.5, grounding=MILD_NO_STREAKS)
    assert res.evidence == ["contradicts_findings: noise claimed severe, measured mild, streaks claimed, none in the "
                            "image"]
    assert checks.check_rationale(PAPER_STYLE[2][0], 2.5).ok  # without grounding: no findings check


def test_grounded_prompt_carries_findings_and_feedback():
    p = prompts.teacher_prompt(2.0, MILD_NO_STREAKS, feedback="unseen_view: crops")
    assert p.startswith(prompts.teacher_prompt(2.0)) and "about 25 HU" in p and "mild noise" in p
    assert "streak artifacts are absent" in p and "rejected by our quality check (unseen_view: crops)" in p
    assert "could not be measured reliably" in prompts.teacher_prompt(2.0, MILD_UNKNOWN)


def _grounded_teacher_reply(req):
    """First answer contradicts the findings; when told why, the fake teacher follows the measurements."""
    if "rejected by our quality check" not in req.prompt:
        text = ("Heavy coarse noise dominates and dense streaks radiate across the whole slice, obscuring organ "
                "edges and low-contrast structures, which limits diagnostic use considerably.")
    else:
        cls = re.search(r"i\.e\. (\w+)", req.prompt).group(1)
        noise = {"no": "Image noise is minimal"}.get(cls, f"{cls.capitalize()} noise is visible")
        streak = "faint streaks cross the field" if "streak artifacts are present" in req.prompt else \
            "no streak artifacts are seen"
        text = f"{noise} in the soft tissue, and {streak}. Organ edges are mostly sharp and contrast is preserved."
    return answer(json.dumps({"rationale": text, "score": req.score}))(req)


def test_grounded_gemini_build_reasks_and_records_findings(tmp_path):
    data = make_ldctiqa(tmp_path / "sim", n=8, size=64)
    out, cache = tmp_path / "ds", tmp_path / "cache.jsonl"
    opts = BuildOptions(ldctiqa=data, teacher="gemini", out=out, split="stratified", concurrency=2, cache=cache,
                        progress=False, reask=2)
    with FakeGemini(default=_grounded_teacher_reply) as srv:
        res = build_dataset(opts, teacher=gemini_teacher(srv.url))
        reqs = list(srv.requests)
    asked = [it for it in res.items if it.split != "test"]
    first = [r for r in reqs if "rejected by our quality check" not in r.prompt]
    again = [r for r in reqs if "rejected by our quality check" in r.prompt]
    assert len(first) == len(asked) and all("Measurements of this same image" in r.prompt for r in reqs)
    reasked = [it for it in asked if it.previous]
    assert again and len(again) == len(reasked) and all("contradicts_findings" in r.prompt for r in again)
    assert all(it.status == "kept" for it in asked)  # every re-asked row was fixed
    g = res.provenance["grounding"]
    assert (g["measured"], g["reasked"], g["reasked_kept"]) == (len(res.items), len(reasked), len(reasked))
    assert res.provenance["usage"]["prompt_tokens"] == sum(
        r.usage.prompt_tokens for it in asked for r in (*it.previous, it.result))  # re-asks are costed
    ds = load_dataset(str(out))
    row = ds["train"][0]
    assert row["noise_hu"] > 0 and row["noise_severity"] in ("none", "mild", "moderate", "severe")
    assert isinstance(row["streaks"], bool) and row["streak_index"] >= 0
    assert "Grounding in measured findings" in (out / "README.md").read_text()
    assert sum(int(r["reasked"]) for r in read_audit(out).values()) == len(reasked)
    # a re-run takes every round from the cache: no request
    with FakeGemini(default=_grounded_teacher_reply) as srv:
        build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=out, split="stratified", cache=cache,
                                   progress=False, reask=2), teacher=gemini_teacher(srv.url))
        assert srv.requests == []


def test_template_teacher_words_noise_from_measured_findings(tmp_path):
    data = make_ldctiqa(tmp_path / "sim", n=8, size=64)
    res = build_dataset(BuildOptions(ldctiqa=data, teacher="template", out=tmp_path / "ds", split="stratified",
                                     progress=False))
    kept = [it for it in res.items if it.status == "kept"]
    assert kept and res.provenance["grounding"]["measured"] == len(res.items)
    for it in kept:
        claimed = extract_claims(it.check.text).noise
        assert {"absent": "none"}.get(claimed, claimed) == it.extra["noise_severity"], it.check.text
        truth = truth_rubric(it.check.text, it.metadata["dose_fraction"], it.metadata["n_views"])
        assert truth["streaks_named"] == truth["streaks_applied"] and truth["streaks_stated"] == truth[
            "streaks_expected"], it.check.text


# QA round 8: on simulated data, where the truth is known, a rationale describing a hip prosthesis, rings and motion
# (with the right score) was kept in train/validation with exit 0; only audit.csv flagged it.
HALLUCINATED = ("Metal artifacts from a hip prosthesis and ring artifacts dominate; motion blur doubles the "
                "organ edges and hides low-contrast detail across the abdomen.")
NEGATED = ("Image noise is mild and no ring, motion or metal artifacts are seen; organ edges stay sharp and "
           "low-contrast detail remains visible across the abdomen.")


def test_artifacts_the_simulator_never_makes_contradict_simulated_data_and_are_only_flagged_on_real_data():
    from ctiqa.findings import grounding
    from ctiqa.simulation import ABSENT_ARTIFACTS
    from ctiqa.vocabulary import OTHER_ARTIFACTS

    assert set(ABSENT_ARTIFACTS) == {"metal", "ring", "motion"} <= set(OTHER_ARTIFACTS)  # beam hardening: a flag
    row = {"noise_hu": 25.0, "noise_severity": "mild", "streaks": False}
    sim, real = grounding(row, {"dose_fraction": 1.0, "n_views": 1024}), grounding(row, None)
    assert sim["absent_artifacts"] == ABSENT_ARTIFACTS and real["absent_artifacts"] == ()
    res = checks.check_rationale(HALLUCINATED, 2.5, 2.5, grounding=sim)
    assert (res.reasons, res.flags) == (["contradicts_findings"], [])
    assert res.evidence == ["contradicts_findings: metal, motion and ring artifacts claimed, the simulated data has none"]
    res = checks.check_rationale(HALLUCINATED, 2.5, 2.5, grounding=real)  # real data: unverifiable, kept, flagged
    assert res.ok and res.flags == [f"unverified_artifact: {a}" for a in ("metal", "motion", "ring")]
    for g in (sim, real):
        assert checks.check_rationale(NEGATED, 2.5, grounding=g).flags == []  # negated: no claim
        assert checks.check_rationale(NEGATED, 2.5, grounding=g).ok
    beam = checks.check_rationale(PAPER_STYLE[1][0], 2.5, grounding=sim | {"streaks": False})
    assert beam.ok and beam.flags == ["unverified_artifact: beam_hardening"]


def _hallucinating_teacher(req):
    """Describes metal, rings and motion until told why that was rejected; then follows the measurements."""
    if "rejected by our quality check" not in req.prompt:
        return answer(json.dumps({"rationale": HALLUCINATED, "score": req.score}))(req)
    return _grounded_teacher_reply(req)


def test_hallucinated_artifacts_on_simulated_data_are_asked_again_with_the_reason_and_never_kept(tmp_path):
    data = make_ldctiqa(tmp_path / "sim", n=8, size=64)
    with FakeGemini(default=_hallucinating_teacher) as srv:
        res = build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=tmp_path / "ds", split="stratified",
                                         cache=tmp_path / "c.jsonl", progress=False, reask=1),
                            teacher=gemini_teacher(srv.url))
        again = [r for r in srv.requests if "rejected by our quality check" in r.prompt]
    asked = [it for it in res.items if it.split != "test"]
    assert len(again) == len(asked) and all(
        "(contradicts_findings: metal, motion and ring artifacts claimed, the simulated data has none)" in r.prompt
        for r in again)
    assert all(it.status == "kept" and "metal" not in it.check.text for it in asked)
    ds = load_dataset(str(tmp_path / "ds"))
    assert ds["train"].num_rows and not [r for s in ("train", "validation") for r in ds[s]["rationale"] if "metal" in r]
    # without re-asking, such rows are left out (here every one: nothing is written)
    with FakeGemini(default=_hallucinating_teacher) as srv, pytest.raises(EmptySplitError):
        build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=tmp_path / "ds0", split="stratified",
                                   cache=tmp_path / "c0.jsonl", progress=False, reask=0),
                      teacher=gemini_teacher(srv.url))


def test_flagged_rationales_kept_on_real_data_are_counted_on_the_console(tmp_path, capsys):
    data = make_ldctiqa(tmp_path / "real", n=10, size=64, simulated=False)
    with FakeGemini(default=_hallucinating_teacher) as srv:
        res = build_dataset(BuildOptions(ldctiqa=data, teacher="gemini", out=tmp_path / "ds", split="stratified",
                                         cache=tmp_path / "c.jsonl", progress=False, reask=2),
                            teacher=gemini_teacher(srv.url))
    n = sum(it.status == "kept" for it in res.items)
    assert n and all(it.status == "kept" for it in res.items if it.split != "test")
    assert (f"kept rationales flagged (see audit.csv): unverified_artifact metal {n}, motion {n}, ring {n}\n"
            in capsys.readouterr().out)
