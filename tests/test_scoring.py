"""ctiqa.scoring: a table of realistic model answers with the exact score (or None) and rule each must give."""

from __future__ import annotations

import pytest

from ctiqa.scoring import RULES, ParsedScore, parse_score_detailed

CASES = [
    # --- trained formats (strict)
    ("Score: 2.2\nReasoning: Moderate noise with fine streaks from sparse sampling.", 2.2, "strict-first"),
    ("Score: 0.8\nReasoning: Severe noise.", 0.8, "strict-first"),
    ("Score: 4.0", 4.0, "strict-first"),
    ("  Score: 3\n", 3.0, "strict-first"),
    ("Score: 1.4\nReasoning: A score of 4 would need much less noise; this image scores 1.4.", 1.4, "strict-first"),
    ("Reasoning: Streaks radiate from bone; edges are blurred.\nScore: 1.6", 1.6, "strict-last"),
    ("Reasoning: Very clean image, sharp edges.\n\nScore: 3.8\n", 3.8, "strict-last"),
    ("Score: 10.0\nReasoning: ...", None, "out-of-range"),
    ("Score: 0.0\nReasoning: Non-diagnostic.", 0.0, "strict-first"),
    # --- chatty zero-shot prose
    ("Of course. Based on the image, I would rate the overall diagnostic quality as 3 (good).", 3.0, "labelled"),
    ("This slice shows mild noise. Overall quality score: 2.5 out of 4.", 2.5, "labelled"),
    ("I'd give it a 3/4. The liver edges are sharp.", 3.0, "labelled"),
    ("The image quality is good. Rating: 3", 3.0, "labelled"),
    ("The noise is marked and low-contrast lesions would be missed. I would score this image 1.5 out of 4.", 1.5,
     "labelled"),
    ("Initially I thought a score of 2 was fair, but given the streaks, my final score is 1.", 1.0, "labelled"),
    ("Quality score: three.", 3.0, "labelled"),
    ("I would rate it two out of four.", 2.0, "labelled"),
    ("Overall: 3.5", 3.5, "labelled"),
    ("Final answer: 2.8", 2.8, "labelled"),
    # --- markdown
    ("**Score:** 3\n\n**Reasoning:** Mild noise, no streaks.", 3.0, "labelled"),
    ("## Assessment\n- Noise: moderate\n- Streaks: none\n\n**Overall Image Quality Score: 2.5/4**", 2.5, "labelled"),
    ("| Criterion | Rating |\n|---|---|\n| Overall | **2** |", 2.0, "labelled"),
    ("**Rating: Good (3)**", 3.0, "labelled"),
    # --- ranges
    ("Score: 2-3. Noise is moderate.", 2.5, "labelled"),
    ("I would rate the quality as 2 to 3.", 2.5, "labelled"),
    ("Score: between 1.5 and 2.5", 2.0, "labelled"),
    # --- echoed scales
    ("On a scale of 0-4, I'd give it a 2.", 2.0, "labelled"),
    ("Rate the overall diagnostic quality on a continuous scale (0 = bad, 1 = poor, 2 = fair, 3 = good, "
     "4 = excellent).", None, "no-score"),
    ("The quality is rated from 0 (very poor) to 4 (excellent). This image is noisy.", None, "no-score"),
    ("Score (0-4): 1.8", 1.8, "labelled"),
    ("Using the scale 0 = bad ... 4 = excellent, my rating is 1.", 1.0, "labelled"),
    ("Quality score (0–4): not assessable from this image.", None, "no-score"),
    # --- refusals and failures
    ("I'm sorry, but I can't provide a medical assessment of this image.", None, "no-score"),
    ("", None, "no-score"),
    ("The image shows the abdomen at the level of the kidneys. 1. Noise: moderate. 2. Streaks: mild.", None,
     "no-score"),
    ("Slice thickness 3 mm, 120 kV. The image looks fine.", None, "no-score"),
    # --- out of range / other scales: never read as a 0-4 score
    ("Score: 7/10", None, "out-of-range"),
    ("Overall rating: 10.0", None, "out-of-range"),
    ("I'd rate it 8 out of 10.", None, "out-of-range"),
    ("On a scale of 1 to 10 the quality is 7.", None, "no-score"),
    # --- bare and unlabelled
    ("3.2", 3.2, "bare-number"),
    ("0.8", 0.8, "bare-number"),
    ("2.5/4", 2.5, "fraction"),
    ("Rating: 0.8 (poor)", 0.8, "labelled"),
    ("Score: -1", None, "out-of-range"),
    ("I would rate this image as excellent (4).", 4.0, "labelled"),
    ("Based on a scale of 0 to 4, where 0 is bad and 4 is excellent, this image would be rated as a 3.", 3.0,
     "labelled"),
    ("Score: 2.2 Reasoning: moderate noise. A score of 4 would require less noise.", 2.2, "strict-first"),
    ("I cannot rate images of 5 mm slices.", None, "no-score"),
    # --- JSON answers (zero-shot models, score-only fine-tunes)
    ('{"score": 2.6, "reasoning": "Moderate noise."}', 2.6, "json"),
    ('{"rating": 3}', 3.0, "json"),
    ('```json\n{"quality_score": "1.8", "findings": ["noise"]}\n```', 1.8, "json"),
    ('Here is my assessment: {"assessment": {"overall_score": 3.2}, "notes": "sharp"}. Thanks!', 3.2, "json"),
    ('{"score": 8, "scale": "0-10"}', None, "out-of-range"),
    ('{"score": null, "reason": "cannot assess"}', None, "no-score"),
    ('{"score": true}', None, "no-score"),
    # --- an echoed scale inside the label, decimal commas
    ("Quality (0-4): 3", 3.0, "labelled"),
    ("Image quality [0-4]: 2.4. Noise is mild.", 2.4, "labelled"),
    ("Score: 3,5", 3.5, "strict-first"),
    ("Bewertung / overall rating: 2,4 (fair)", 2.4, "labelled"),
    ("We rated 1,200 images in total.", None, "no-score"),
    # --- a stray number far from any score word: a graded finding is not the score
    ("Findings: grade 2 motion artifact in the upper abdomen. Noise is moderate and the liver edges are soft. "
     "This is slice 4 of 120; overall fair.", None, "no-score"),
    ("There is grade 3 streaking from the shoulders. Overall quality is fair.", None, "no-score"),
    ("Grade 2 motion artifact. Overall score: 1.6", 1.6, "labelled"),
    # --- QA round 4: a value on another scale named right after it; an exponent
    ("Score: 3 (1-5 scale)", None, "out-of-range"),
    ("Score: 2.5 (on a 0-10 scale)", None, "out-of-range"),
    ("Quality score: 3 on a 1-5 scale", None, "out-of-range"),
    ("Score: 2.5 (0-4 scale)", 2.5, "strict-first"),
    ("Score: 3.1\nReasoning: mild noise; on a 1-5 scale the liver would be a 4.", 3.1, "strict-first"),
    ("Score: 1e1", None, "no-score"),
]


@pytest.mark.parametrize(("text", "value", "rule"), CASES)
def test_parse_table(text, value, rule):
    got = parse_score_detailed(text)
    assert isinstance(got, ParsedScore)
    assert got.rule == rule, got
    assert got.rule in RULES
    if value is None:
        assert got.value is None, got
    else:
        assert got.value == pytest.approx(value, abs=1e-12), got
        assert got.matched  # the span it was read from is recorded


def test_table_size():
    assert len(CASES) >= 30


def test_never_zero_on_failure():
    """A failure is None with a failure rule, never a 0 that would be scored as a 'bad' image."""
    for text in ("Score: 10.0", "N/A", "The image is of excellent quality.", "score of ten", None, "   "):
        got = parse_score_detailed(text)
        assert got.value is None and got.rule in ("out-of-range", "no-score"), (text, got)


def test_scale_has_one_home():
    """The 0-4 range and its anchor words are defined only in ctiqa.scale; prompts and rubrics speak its words."""
    import re
    from pathlib import Path

    import ctiqa
    from ctiqa import explanations, prompts, scale

    root = Path(ctiqa.__file__).parent
    for path in [*root.rglob("*.py"), *(root.parent / "datasets_builder").rglob("*.py")]:
        if path.name == "scale.py":
            continue
        src = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*SCORE_(MAX|MIN)\s*=", src, re.MULTILINE), path
        assert not re.search(r"\{\s*0:\s*\"bad\"", src), path
        assert not re.search(r"\"excellent\":\s*4", src), path
    assert scale.SCALE_TEXT in prompts.instruction()
    assert explanations.stated_quality("Overall the image quality is adequate.") == scale.QUALITY_LABELS["adequate"]
    assert [scale.in_scale(v) for v in (0, 4.0, 4.01, -0.0, float("nan"), True, "3")] == [
        True, True, False, True, False, False, False]
