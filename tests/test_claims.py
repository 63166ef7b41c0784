"""extract_claims on sentences in the styles the project meets: teacher reports (Gemini 2.5 Pro: long, "Of course.",
crops), chatty zero-shot answers, the fine-tuned model's short output and the template teacher."""

import pytest

from ctiqa.explanations import extract_claims, truth_rubric

# (text, noise, streaks, other_artifacts)
CASES = [
    # --- the fine-tuned model / template teacher style (short, fixed phrases)
    ("Image noise is minimal; there are no visible streaks. Overall quality is excellent for diagnosis.",
     "absent", "absent", ()),
    ("Noise is low and fine-grained, and streak artifacts are absent.", "absent", "absent", ()),
    ("Mild noise is visible, and faint streaks cross the field.", "mild", "mild", ()),
    ("Noise is mild but noticeable; subtle streaking is present.", "mild", "mild", ()),
    ("Moderate grainy noise is present; moderate streaks radiate across the slice.", "moderate", "moderate", ()),
    ("A moderate mottled noise texture is present, and no streak artifacts are seen.", "moderate", "absent", ()),
    ("Heavy coarse noise dominates; dense streaks radiate across the whole slice.", "severe", "severe", ()),
    ("Noise is heavy and coarse, and pronounced streak artifacts cross the image.", "severe", "severe", ()),
    ("Strong grainy mottle is present; streaking of moderate intensity is visible.", "severe", "moderate", ()),
    ("Organ edges are softened. Overall quality is fair.", None, None, ()),
    ("Score: 2.5", None, None, ()),
    ("", None, None, ()),
    # --- negations and lists
    ("No ring, motion or metal artifacts are seen.", None, None, ()),
    ("There are no ring, motion, or metal artifacts, and noise is moderate.", "moderate", None, ()),
    ("No streaks, moderate noise.", "moderate", "absent", ()),
    ("Neither streaks nor noise are seen.", "absent", "absent", ()),
    ("There is no evidence of significant streak artifacts.", None, "absent", ()),
    ("The image is free of streaks and shows only slight graininess.", "mild", "absent", ()),
    ("I don't see any streaks, but the image is a bit noisy.", "mild", "absent", ()),
    ("The slice is artifact-free.", None, "absent", ()),
    ("No artifacts. Noise: moderate.", "moderate", "absent", ()),
    ("Streaking is absent and noise is mild.", "mild", "absent", ()),
    ("Streak artifacts are not seen; noise is severe.", "severe", "absent", ()),
    ("Streaks? None. Noise? Mild.", "mild", "absent", ()),
    ("Noise: moderate; streaks: none", "moderate", "absent", ()),
    ("Without any appreciable streaking, the image shows moderate noise.", "moderate", "absent", ()),
    # --- "faint", "not prominent", hedges (read as assertions at the stated severity)
    ("Faint streaks are seen near the bone.", None, "mild", ()),
    ("Streak artifacts are not prominent.", None, "mild", ()),
    ("Noise is present but not prominent.", "mild", None, ()),
    ("There is possible mild streaking posteriorly.", None, "mild", ()),
    ("There may be subtle streaks.", None, "mild", ()),
    ("Possible streaks from the spine.", None, "present", ()),
    ("Noise is noticeable but streaks are faint.", "present", "mild", ()),
    ("Streaks are present but faint.", None, "mild", ()),
    ("Minimal streaking is seen.", None, "mild", ()),
    # --- chatty zero-shot answers
    ("Sure! Looking at this CT slice, the image appears quite noisy, with a grainy texture throughout the soft "
     "tissues. I don't see obvious streak artifacts. I'd rate it 2/4.", "present", "absent", ()),
    ("To assess image quality I look at noise, streaks and contrast. Here, noise is moderate.", "moderate", None, ()),
    ("This image has a high level of noise which makes fine detail hard to see.", "severe", None, ()),
    ("The signal-to-noise ratio is good and there are no streaks.", None, "absent", ()),
    ("Overall good quality with low-contrast detail well preserved.", None, None, ()),
    ("The image looks clean with minimal noise, though there is some streaking at the edges.",
     "absent", "present", ()),
    # --- teacher reports in the paper's style (Gemini 2.5 Pro: "Of course.", crops, other artifacts)
    ("Of course. The provided crops reveal prominent ring artifacts centered on the isocenter and beam hardening "
     "from the spine, with moderate quantum mottle in the liver.", "moderate", None, ("beam_hardening", "ring")),
    ("Of course. Here is the assessment: **Noise:** Moderate, grainy. **Streak artifacts:** None significant. "
     "**Other:** Mild motion artifact at the diaphragm.", "moderate", "absent", ("motion",)),
    ("The zoomed views show metallic streak artifacts from surgical clips in the right upper quadrant.",
     None, "present", ("metal",)),
    ("Of course. There are no ring artifacts and no motion blurring; however, subtle beam-hardening cupping is "
     "seen.", None, None, ("beam_hardening",)),
    ("The noise is considerable, obscuring low-contrast lesions, while streaks are only faintly visible.",
     "severe", "mild", ()),
    ("Respiratory motion artifacts are absent. Image noise is mildly elevated.", "mild", None, ()),
    ("Noise is not significant, and no streaking is present.", "mild", "absent", ()),
    ("Fine streak artifacts and mild noise; no metal or ring artifacts.", "mild", "present", ()),
]


@pytest.mark.parametrize("text,noise,streaks,other", CASES, ids=[c[0][:40] for c in CASES])
def test_extract_claims(text, noise, streaks, other):
    c = extract_claims(text)
    assert (c.noise, c.streaks, c.other_artifacts) == (noise, streaks, other)


def test_enough_sentences():
    assert len(CASES) >= 40


def test_truth_rubric_reads_claims():
    r = truth_rubric("No streaks are seen; noise is moderate.", 0.2, 512)  # sigma 28.5 HU: mild noise expected
    assert r["noise_named"] and r["noise_stated"] == "moderate" and r["noise_expected"] == "mild"
    assert not r["streaks_applied"] and not r["streaks_named"]
    r = truth_rubric("Streaks are not prominent.", 1.0, 256)
    assert r["streaks_named"] and r["streaks_stated"] == "mild" == r["streaks_expected"]


def test_findings_check_and_faithfulness():
    from ctiqa.explanations import faithfulness, findings_check

    mild_clean = {"noise_severity": "mild", "streaks": False}
    c = findings_check("Heavy coarse noise dominates; no streaks are seen.", mild_clean)
    assert (c["noise_bands_off"], c["noise_agrees"], c["noise_contradicts"]) == (2, False, True)
    assert c["streaks_agree"] is True and not c["streaks_contradict"] and c["unverified"] == []
    c = findings_check("Mild noise; faint streaks and a ring artifact near the isocenter.", mild_clean)
    assert c["noise_agrees"] and c["streaks_contradict"] and c["streaks_agree"] is False and c["unverified"] == ["ring"]
    c = findings_check("The image is noisy.", {"noise_severity": "none", "streaks": True})
    assert c["noise_agrees"] is False and c["noise_bands_off"] is None and c["streaks_agree"] is None
    assert findings_check("Image noise is minimal.", {"noise_severity": "none", "streaks": False})["noise_agrees"]

    records = [{"text": "Mild noise; no streaks.", "findings": mild_clean},
               {"text": "Moderate noise and dense streaks; beam hardening.", "findings": mild_clean},
               {"text": "Organ edges are sharp.", "findings": mild_clean},
               {"text": "Mild noise.", "findings": None},
               {"text": None, "findings": mild_clean}]
    f = faithfulness(records)
    assert (f["n_rationales"], f["n_measured"]) == (4, 3)
    assert f["noise_addressed_rate"] == pytest.approx(2 / 3) and f["streaks_addressed_rate"] == pytest.approx(2 / 3)
    assert f["noise_agreement_rate"] == 0.5 and f["noise_within_one_band_rate"] == 1.0
    assert f["streak_agreement_rate"] == 0.5 and f["streak_contradiction_rate"] == pytest.approx(1 / 3)
    assert f["unverified_rate"] == pytest.approx(1 / 3) and f["unverified_counts"] == {"beam_hardening": 1}
    assert records[1]["faithfulness"]["streaks_contradict"] and "faithfulness" not in records[3]
    assert faithfulness([{"text": None, "findings": mild_clean}]) is None  # no rationale (noise-sigma baseline)
