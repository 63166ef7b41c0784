"""ctiqa.rewards: each GRPO reward on fixed texts, with exact expected values."""

from __future__ import annotations

import math

import pytest

from ctiqa import rewards
from ctiqa.rewards import (
    claim_agreement,
    faithfulness_reward,
    format_reward,
    ranking_reward,
    score_reward,
    truth_reference,
)


def _conv(text: str) -> list[dict]:
    """A completion as TRL's GRPOTrainer passes it for conversational data."""
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------ score
def test_score_reward_is_exp_of_the_error_over_tau():
    texts = ["Score: 2.3\nReasoning: Mild noise.", "Score: 2.0\nReasoning: Mild noise.",
             "Score: 3.5\nReasoning: Mild noise.", "Reasoning: Mild noise.\nScore: 2.3"]
    got = score_reward([_conv(t) for t in texts], [2.3] * 4)
    assert got == pytest.approx([1.0, math.exp(-1.0), math.exp(-4.0), 1.0])
    assert score_reward(["Score: 2.0"], [2.3], tau=0.15) == pytest.approx([math.exp(-2.0)])


def test_score_reward_is_zero_when_the_strict_parse_fails():
    # prose with a labelled score, a bare number, an out-of-range score, nothing: none is the trained format
    texts = ["The overall quality score is 2.3.", "2.3", "Score: 9.0\nReasoning: x", "", None]
    assert score_reward(texts, [2.3] * 5) == [0.0] * 5


def test_score_reward_rejects_a_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        score_reward(["Score: 1.0"], [1.0], tau=0.0)


# ------------------------------------------------------------------------------------------------ format
def test_format_reward_penalises_unparseable_and_missing_reasoning():
    texts = ["Score: 2.2\nReasoning: Mild noise is visible.",     # the trained format
             "Reasoning: Mild noise is visible.\nScore: 2.2",     # rationale-first format
             "Score: 2.2",                                         # no reasoning
             "Score: 2.2\nReasoning:   ",                          # empty reasoning
             "I would rate this image a 2.",                       # unparseable by the strict rule
             "Score: 12.0\nReasoning: Mild noise."]                # out of range
    assert format_reward([_conv(t) for t in texts]) == [0.0, 0.0, -0.5, -0.5, -1.0, -1.0]
    assert format_reward(["no score"], penalty_unparseable=-2.0) == [-2.0]


# ---------------------------------------------------------------------------------------- faithfulness
@pytest.mark.parametrize("claim, reference, kw, expected", [
    (None, 0, {}, 0.0),                         # silence about nothing
    (None, 2, {}, -0.25),                       # silence about a measured degradation costs a little
    ("absent", 0, {}, 1.0),
    ("absent", 3, {}, -1.0),
    ("present", 0, {}, -1.0),                   # streaks named where none are
    ("present", 2, {}, 0.5),                    # named without a severity
    ("present", 2, {"severity_known": False}, 1.0),
    ("mild", 0, {}, -1.0),
    ("mild", 0, {"none_reads_mild": True}, 1.0),   # minimal noise read as mild
    ("severe", 0, {"none_reads_mild": True}, -1.0),
    ("moderate", 2, {}, 1.0),
    ("mild", 2, {}, 0.0),                       # one band off
    ("mild", 3, {}, -1.0),                      # two bands off
    ("severe", 1, {"severity_known": False}, 1.0),
    ("present", 0, {"false_claim_cost": 2.0}, -2.0),
    ("absent", 2, {"false_claim_cost": 2.0}, -1.0),   # a missed degradation keeps its cost
])
def test_claim_agreement_table(claim, reference, kw, expected):
    assert claim_agreement(claim, reference, **kw) == expected


FAITHFUL = "Score: 2.0\nReasoning: Moderate grainy noise is present; no streak artifacts are seen."
UNFAITHFUL = "Score: 2.0\nReasoning: Moderate grainy noise is present; dense streaks radiate across the whole slice."


def test_faithful_and_unfaithful_rationales_for_the_same_findings_differ():
    got = faithfulness_reward([_conv(FAITHFUL), _conv(UNFAITHFUL)], noise_severity=["moderate"] * 2,
                              streaks=[False] * 2, streak_severity=[None] * 2)
    assert got == [1.0, 0.0]  # (noise 1 + streaks 1) / 2; (noise 1 + false streaks -1) / 2
    # a false streak can be made to cost more than a missed one
    assert faithfulness_reward([UNFAITHFUL], noise_severity=["moderate"], streaks=[False],
                               false_streak_cost=2.0) == [-0.5]


def test_faithfulness_severity_silence_and_unverified_claims():
    texts = [
        # streaks truly moderate, stated faint (one band off); noise truly severe, stated mild (two bands off)
        "Score: 1.0\nReasoning: Mild noise is visible; faint streaks cross the field.",
        # says nothing about noise or streaks although both are there
        "Score: 1.0\nReasoning: Organ edges are softened.",
        # right on both, plus a ring artifact no measurement can check
        "Score: 1.0\nReasoning: Noise is heavy and coarse; moderate streaks radiate across the slice. "
        "A ring artifact is visible.",
    ]
    got = faithfulness_reward(texts, noise_severity=["severe"] * 3, streaks=[True] * 3,
                              streak_severity=["moderate"] * 3)
    assert got == [(-1.0 + 0.0) / 2, (-0.25 - 0.25) / 2, 1.0 - 0.25]


def test_measured_streak_call_without_severity_accepts_any_presence_claim():
    text = "Score: 1.0\nReasoning: Moderate grainy noise is present; faint streaks cross the field."
    assert faithfulness_reward([text], noise_severity=["moderate"], streaks=[True]) == [1.0]
    assert faithfulness_reward([text], noise_severity=["moderate"], streaks=[False]) == [0.0]


# ------------------------------------------------------------------------------------------------ ranking
def test_ranking_reward_counts_correctly_ordered_pairs():
    texts = ["Score: 1.0\nReasoning: a", "Score: 2.5\nReasoning: b", "Score: 2.0\nReasoning: c", "no score"]
    got = ranking_reward(texts, [1.0, 2.0, 3.0, 4.0])
    # each against the other true scores; the unparsed partner counts 0 and scores 0 itself
    assert got == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0.0])
    assert ranking_reward(["Score: 2.0", "Score: 2.0"], [2.0, 3.0]) == [0.5, 0.5]  # a tie counts 1/2
    assert ranking_reward(["Score: 2.0", "Score: 3.0"], [2.0, 2.0]) == [None, None]  # nothing to rank


# ------------------------------------------------------------------------------------------------ references
def test_truth_reference_uses_the_rubric_bands():
    assert truth_reference(1.0, 1024) == {"noise_severity": "none", "streaks": False, "streak_severity": None}
    assert truth_reference(0.1, 64) == {"noise_severity": "severe", "streaks": True, "streak_severity": "severe"}
    assert truth_reference(1.0, 300, noise_sigma_hu=40.0) == {"noise_severity": "moderate", "streaks": True,
                                                               "streak_severity": "mild"}


def test_every_reward_is_registered_under_its_own_name():
    assert set(rewards.REWARDS) == {"score_reward", "format_reward", "faithfulness_reward", "ranking_reward"}
