"""Evaluation harness on the tiny Gemma 3: probability scores, ctiqa evaluate (model / predictions file), report.

Everything runs offline on real code paths: the tiny model from ctiqa.tiny, a small dataset in the ctiqa schema
written as a Hub-layout parquet folder, the ctiqa_iqa evaluate module loaded by path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctiqa import CTIQAError
from ctiqa.cli import main as ctiqa_main
from ctiqa.explanations import truth_rubric
from ctiqa.inference import load_model, predict_images, probability_scores, score_token_ids
from ctiqa.prompts import PROMPT_VERSION, completion_messages, format_target, prompt_messages

N = 6
# (dose_fraction, n_views, score); quantum noise 9 HU / sqrt(dose * views / 1024): 9, 25, 51, 114, 13, 29 HU
LADDER = [(1.0, 1024, 3.8), (0.5, 256, 2.6), (0.25, 128, 1.8), (0.1, 64, 0.4), (0.5, 1024, 3.0), (1.0, 100, 1.2)]
RATIONALES = [
    "Image noise is minimal over the liver, and there are no visible streaks.",
    "Mild noise is visible in the abdominal soft tissue; faint streaks cross the field.",
    "Moderate grainy noise is present, and moderate streaks radiate across the abdomen.",
    "Heavy coarse noise dominates; dense streaks radiate across the whole slice.",
    "Mild noise is visible; streak artifacts are absent.",
    "Image noise is minimal, and dense streaks radiate across the whole slice.",
]


def _strict_json(path: Path):
    def bad(x):
        raise AssertionError(f"{path}: non-strict JSON constant {x}")

    return json.loads(path.read_text(), parse_constant=bad)


def write_dataset(root: Path, n: int = N, fmt: str = "score-first") -> Path:
    """A small dataset in the ctiqa schema (simulated-data columns included), as a Hub-layout folder."""
    import datasets

    rng = np.random.default_rng(0)
    rows: dict[str, list] = {k: [] for k in ("id", "score", "prompt", "completion", "images", "rationale", "teacher",
                                              "prompt_version", "target_format", "base_slice", "dose_fraction",
                                              "n_views", "synthetic")}
    for i in range(n):
        dose, views, score = LADDER[i % len(LADDER)]
        img = Image.fromarray(np.clip(rng.normal(120, 80 * (1 - dose) + 4, (48, 48, 3)), 0, 255).astype(np.uint8))
        rat = RATIONALES[i % len(RATIONALES)]
        rows["id"].append(f"{i:04d}")
        rows["score"].append(score)
        rows["prompt"].append(prompt_messages(fmt))
        rows["completion"].append(completion_messages(format_target(score, rat, fmt)))
        rows["images"].append([img])
        rows["rationale"].append(rat)
        rows["teacher"].append("ctiqa-template-v1")
        rows["prompt_version"].append(PROMPT_VERSION)
        rows["target_format"].append(fmt)
        rows["base_slice"].append("slice-a")
        rows["dose_fraction"].append(dose)
        rows["n_views"].append(views)
        rows["synthetic"].append(True)
    ds = datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nlicense: other\n---\n# ctiqa test dataset\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "data")


@pytest.fixture(scope="module")
def lm(tiny):
    return load_model(str(tiny))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------------------ probability scores
def test_forced_three_gives_exactly_three(lm):
    """A model forced to put all mass on '3' at the score position and on '0' after '.' scores exactly 3.0."""
    ids = score_token_ids(lm, "score-first")
    three, zero, dot = ids["int_digits"][3], ids["digits"][0], ids["dot"]

    def force(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]
        logits = torch.full_like(output.logits, float("-inf"))
        logits[..., three] = 0.0
        logits[last == dot, ..., three] = float("-inf")
        logits[last == dot, ..., zero] = 0.0
        output.logits = logits
        return output

    handle = lm.model.register_forward_hook(force, with_kwargs=True)
    try:
        scores = probability_scores(lm, _images(3), fmt="score-first", batch_size=2)
    finally:
        handle.remove()
    for s in scores:
        assert s.score == 3.0
        assert s.std == 0.0
        assert s.p_digits == [0.0, 0.0, 0.0, 1.0, 0.0]
        assert s.mass == 1.0 and s.decimal_mass == 1.0


def test_cached_decimal_pass_equals_full_forward(lm):
    """The KV-cache continuation gives the same expected score as full forward passes over 'Score: d.'."""
    ids = score_token_ids(lm, "score-first")
    int_digits, digits = ids["int_digits"], ids["digits"]
    img = _images(1, seed=3)
    got = probability_scores(lm, img, fmt="score-first")[0]
    proc = lm.processor
    with torch.inference_mode():
        def dist(text, tokens):
            batch = proc(text=[text], images=[[img[0]]], return_tensors="pt", add_special_tokens=False)
            return lm.model(**batch).logits[0, -1].float().softmax(-1)[tokens]

        p = dist(ids["prompt"], int_digits)
        p_int = p / p.sum()
        expected = float(p_int[4]) * 4.0
        for d in range(4):
            q = dist(f"{ids['prompt']}{d}.", digits)
            q = q / q.sum()
            expected += float(p_int[d]) * (d + float((q * torch.arange(10) / 10).sum()))
    assert got.score == pytest.approx(expected, abs=1e-5)
    assert 0.0 < got.mass < 1.0 and got.std > 0.0
    assert sum(got.p_digits) == pytest.approx(1.0)


def test_rationale_first_has_no_probability_score(lm):
    with pytest.raises(CTIQAError, match="starts with the score"):
        probability_scores(lm, _images(1), fmt="rationale-first")
    pred = predict_images(lm, _images(1), fmt="rationale-first", max_new_tokens=3)[0]
    assert pred.prob_score is None and pred.text is not None and pred.parse_rule is not None


def test_adapter_folder_and_batch_invariance(lm, tiny, tmp_path):
    """An adapter folder (as recipes/sft.py saves it) loads via --model; batching does not change scores."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with_adapter = load_model(str(tmp_path / "adapter"))
    assert with_adapter.adapter == str(tmp_path / "adapter") and with_adapter.model_id == str(tiny)
    imgs = _images(3, seed=5)
    a = [s.score for s in probability_scores(with_adapter, imgs, batch_size=3)]
    b = [s.score for s in probability_scores(with_adapter, imgs, batch_size=1)]
    base_scores = [s.score for s in probability_scores(lm, imgs, batch_size=3)]
    assert a == pytest.approx(b, abs=1e-5)
    assert a != pytest.approx(base_scores, abs=1e-6)  # the (non-zero) LoRA weights were applied


# ------------------------------------------------------------------------------------------ ctiqa evaluate
def test_evaluate_model_writes_everything(tiny, dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny), "--dataset", str(dataset), "--split", "test", "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "4", "--bootstrap", "50"]
    assert ctiqa_main(argv) == 0
    for f in ("results.json", "predictions.jsonl", "scatter.png", "bland_altman.png"):
        assert (out / f).is_file(), f
    assert (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    res = _strict_json(out / "results.json")
    assert set(res["metrics"]) == {"parsed", "probability"}
    assert res["metrics"]["probability"]["n"] == N and res["metrics"]["probability"]["n_valid"] == N
    assert res["primary_score"] == "probability"
    prov = res["provenance"]
    assert prov["prompt_version"] == PROMPT_VERSION and prov["settings"]["format"] == "score-first"
    assert prov["settings"]["decoding"] == {"do_sample": False, "max_new_tokens": 6, "generate": True,
                                            "probability_score": True}
    assert prov["model"]["model"] == str(tiny) and prov["packages"]["transformers"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{i:04d}" for i in range(N)]
    for r in rows:
        assert {"id", "score", "parsed_score", "parse_rule", "prob_score", "prob_std", "text"} <= set(r)
        assert 0.0 <= r["prob_score"] <= 4.0
    assert "ctiqa evaluate" in capsys.readouterr().out

    # a re-run with the same settings resumes: nothing left to run, the model is not even loaded
    assert ctiqa_main(argv) == 0
    res2 = _strict_json(out / "results.json")
    assert res2["provenance"]["model"]["resumed_rows"] == N and "load_seconds" not in res2["provenance"]["model"]
    assert res2["metrics"] == res["metrics"]


def test_evaluate_score_only_and_limit(tiny, dataset, tmp_path):
    out = tmp_path / "score-only"
    assert ctiqa_main(["evaluate", "--model", str(tiny), "--dataset", str(dataset), "--out", str(out),
                       "--score-only", "--limit", "4", "--bootstrap", "20"]) == 0
    res = _strict_json(out / "results.json")
    assert list(res["metrics"]) == ["probability"] and res["counts"]["n"] == 4
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(r["text"] is None and r["prob_score"] is not None for r in rows)
    # without --limit the 4 finished rows are reused; other settings move the old rows aside, never delete them
    base = ["evaluate", "--model", str(tiny), "--dataset", str(dataset), "--out", str(out), "--score-only",
            "--bootstrap", "0"]
    assert ctiqa_main(base) == 0
    assert _strict_json(out / "results.json")["provenance"]["model"]["resumed_rows"] == 4
    assert ctiqa_main([*base, "--batch-size", "2"]) == 0
    assert _strict_json(out / "results.json")["provenance"]["model"]["resumed_rows"] == 0
    assert len(list(out.glob("predictions.*.bak.jsonl"))) == 1


def test_bad_inputs_are_clear_errors(tiny, dataset, tmp_path, capsys):
    assert ctiqa_main(["evaluate", "--model", str(tiny), "--dataset", str(dataset), "--split", "nope",
                       "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0000", "score": 1.0, "prediction": 1.2}\nnot json\n')
    assert ctiqa_main(["evaluate", "--predictions", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert ctiqa_main(["evaluate", "--dataset", str(dataset), "--out", str(tmp_path / "z")]) == 2


# ------------------------------------------------------------------------------------------ predictions file
def test_predictions_file_mode_and_explanation_check(dataset, tmp_path):
    f = tmp_path / "preds.jsonl"
    with open(f, "w") as fh:
        for i, (_, _, score) in enumerate(LADDER[:5]):  # id 0005 is missing -> counted as a failure
            row = {"id": f"{i:04d}", "score": score}
            row |= {"text": f"Score: {min(4.0, score + 0.2):.1f}\nReasoning: {RATIONALES[i]}"} if i % 2 == 0 \
                else {"prediction": score - 0.2 if i != 3 else None}
            fh.write(json.dumps(row) + "\n")
    out = tmp_path / "from-file"
    assert ctiqa_main(["evaluate", "--predictions", str(f), "--dataset", str(dataset), "--out", str(out),
                       "--bootstrap", "50"]) == 0
    res = _strict_json(out / "results.json")
    m = res["metrics"]["parsed"]
    assert (m["n"], m["n_valid"], m["n_missing"]) == (6, 4, 2)
    assert res["parse_rules"] == {"strict-first": 3, "given": 1, "missing": 2}
    true = [s for _, _, s in LADDER]
    pred = [3.8 + 0.2, 2.6 - 0.2, 1.8 + 0.2, None, 3.0 + 0.2, None]
    from scipy import stats

    ok = [(p, t) for p, t in zip(pred, true, strict=True) if p is not None]
    assert m["srcc"] == pytest.approx(stats.spearmanr(*zip(*ok, strict=True)).statistic)
    ex = res["explanation_check"]
    assert ex["n_checked"] == 3 and ex["degradation_named_rate"] == 1.0 and ex["severity_match_rate"] == 1.0
    rc = res["rationale_consistency"]  # three rationales with a parsed score, none states an overall quality
    assert (rc["n_rationales"], rc["n_stated"], rc["stated_rate"], rc["consistent_rate"]) == (3, 0, 0.0, None)
    fa = res["faithfulness"]  # the dataset's images are measured (ctiqa.findings) for the three rationales
    assert (fa["n_rationales"], fa["n_measured"], fa["noise_addressed_rate"]) == (3, 3, 1.0)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [("findings" in r, "faithfulness" in r) for r in rows] == [(r.get("text") is not None,) * 2 for r in rows]

    # without a dataset the rows' own scores are the truth
    out2 = tmp_path / "no-dataset"
    assert ctiqa_main(["evaluate", "--predictions", str(f), "--out", str(out2), "--bootstrap", "0"]) == 0
    assert _strict_json(out2 / "results.json")["metrics"]["parsed"]["n"] == 5


def test_explanation_rubric():
    assert truth_rubric("Heavy coarse noise dominates; dense streaks radiate across the slice.", 0.1, 64) \
        == {"noise_sigma_hu": 113.84, "noise_applied": True, "streaks_applied": True, "noise_named": True,
            "streaks_named": True, "noise_expected": "severe", "noise_stated": "severe", "streaks_expected": "severe",
            "streaks_stated": "severe"}
    c = truth_rubric("Mild noise is present, but no streak artifacts are seen.", 0.5, 256)
    assert c["noise_named"] and not c["streaks_named"] and c["streaks_stated"] == "unstated"
    c = truth_rubric("The image shows streaks.", 1.0, 1024)
    assert not c["noise_applied"] and not c["streaks_applied"] and c["streaks_named"]  # a false streak


# ------------------------------------------------------------------------------------------ ctiqa report
def test_report_from_two_dirs(dataset, tmp_path, capsys):
    dirs = []
    rng = np.random.default_rng(1)
    for name, noise in (("good", 0.2), ("poor", 1.5)):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"id": f"{i:04d}", "score": s, "prediction":
                                         float(np.clip(s + rng.normal(0, noise), 0, 4))}) + "\n"
                             for i, (_, _, s) in enumerate(LADDER)))
        out = tmp_path / name
        assert ctiqa_main(["evaluate", "--predictions", str(f), "--dataset", str(dataset), "--out", str(out),
                           "--bootstrap", "50"]) == 0
        dirs.append(str(out))
    md = tmp_path / "report.md"
    assert ctiqa_main(["report", *dirs, "--names", "Model A", "Model B", "--out", str(md),
                       "--bootstrap", "100"]) == 0
    text = md.read_text()
    assert ("| Model | Score | Scored / in split | Failures | SRCC ↑ | PLCC ↑ | KRCC ↑ | MAE ↓ | Overall ↑ |"
            in text)
    assert "| Model A | parsed | 6 / 6 (100%) | 0 |" in text and "| Model B | parsed | 6 / 6 (100%) | 0 |" in text
    assert "every row scored" not in text  # same ids: one table
    assert "## Paired comparison with Model A (parsed)" in text and "| Model B | parsed | 6 |" in text
    assert "## Explanation check" not in text  # predictions without text
    import re

    srcc = {m[1]: float(m[2]) for m in re.finditer(r"\| (Model [AB]) \| parsed \| 6 / 6 \(100%\) \| 0 \| ([-0-9.]+) ",
                                                   text)}
    best = max(srcc, key=srcc.get)
    assert f"Highest SRCC: **{best}** (parsed), {srcc[best]:.3f}." in text
    assert ctiqa_main(["report", *dirs, "--names", "only-one", "--out", str(md)]) == 2


def test_report_compares_rows_on_common_ids(dataset, tmp_path):
    """B scored only half the ids (its easy half: SRCC 0.5 there, A's over all six is 0.03). The report shows the
    coverage and ranks on the three ids both scored, where A is perfect; B is never named best for half the work."""
    preds = {"A": [3.7, 2.7, 1.9, 3.0, 1.0, 2.0], "B": [3.5, 1.9, 2.0, None, None, None], "C": [None] * 6}
    dirs = []
    for name, pred in preds.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"id": f"{i:04d}", "score": s, "prediction": p}) + "\n"
                             for i, ((_, _, s), p) in enumerate(zip(LADDER, pred, strict=True))))
        out = tmp_path / name
        # C has no usable score at all (an untrained model's unparsable text): exit 1, results.json still written
        assert ctiqa_main(["evaluate", "--predictions", str(f), "--dataset", str(dataset), "--out", str(out),
                           "--bootstrap", "0"]) == (1 if name == "C" else 0)
        dirs.append(str(out))
    md = tmp_path / "report.md"
    assert ctiqa_main(["report", *dirs, "--out", str(md), "--bootstrap", "0"]) == 0
    text = md.read_text()
    assert "| A | parsed | 6 / 6 (100%) | 0 | 0.029 |" in text and "| B | parsed | 3 / 6 (50%) | 3 (3 missing) | 0.500 |" in text
    assert "## On the 3 ids every row scored" in text and "left out, no usable score: C (parsed)" in text
    assert "| A | parsed | 3 | 1.000 |" in text and "| B | parsed | 3 | 0.500 |" in text
    assert "Highest SRCC on the 3 ids every row scored: **A** (parsed), 1.000." in text
    assert "**B**" not in text


# ------------------------------------------------------------------------------------------ Gemini zero-shot
def test_gemini_zero_shot(fake_gemini, dataset, tmp_path, capsys):
    """Same student instruction (no true score), same parser; failures counted; a re-run asks only what is open."""
    from ctiqa.clients import RetryPolicy
    from ctiqa.evaluation import load_samples, predict_with_api
    from ctiqa.prompts import instruction
    from ctiqa.testing.fake_gemini import answer, blocked, server_error

    fake_gemini.set_script([
        answer("Of course. The image shows moderate noise.\n\n**Overall quality score: 2.5/4**"),
        answer("Score: 3.1\nReasoning: mild noise."),
        blocked(),
        server_error(503),
        answer("I cannot assess the quality of medical images."),
        answer("Rated from 0 (bad) to 4 (excellent), this is a 1."),
    ], default=answer("Score: 2.0"))
    samples, fmt = load_samples(str(dataset), "test")
    out = tmp_path / "gemini"
    fast = RetryPolicy(max_attempts=1, initial_delay=0.01, max_delay=0.01, jitter=0.0)
    rows, info = predict_with_api(samples, out, api="gemini", model="gemini-2.5-flash", fmt=fmt, key="k1",
                                  base_url=fake_gemini.url, concurrency=1, retry=fast)
    assert len(fake_gemini.requests) == N
    for req in fake_gemini.requests:
        assert req.prompt == instruction("score-first") and req.image_png and req.system is None
        assert not any(f"{s:.1f}" in req.prompt for _, _, s in LADDER)  # the true score is never sent
    by_rule = [(r["parsed_score"], r["parse_rule"]) for r in rows]
    assert by_rule == [(2.5, "labelled"), (3.1, "strict-first"), (None, "no-score"), (None, "no-score"),
                       (None, "no-score"), (None, "no-score")]  # the echoed scale is never read as a score
    assert info["failed_calls"] == 2 and rows[2]["error"].startswith("blocked_prompt")
    assert rows[3]["error"].startswith("http_503")

    # a re-run with the same settings asks again only the transient failure (503), not the blocked prompt
    rows2, info2 = predict_with_api(samples, out, api="gemini", model="gemini-2.5-flash", fmt=fmt, key="k1",
                                    base_url=fake_gemini.url, concurrency=1, retry=fast)
    assert len(fake_gemini.requests) == N + 1 and info2["resumed_rows"] == N - 1
    assert rows2[3]["parsed_score"] == 2.0 and not rows2[3]["error"]

    # the CLI path writes the usual files
    cli_out = tmp_path / "gemini-cli"
    assert ctiqa_main(["evaluate", "--teacher", "gemini", "--model", "gemini-2.5-flash", "--dataset", str(dataset),
                       "--out", str(cli_out), "--base-url", fake_gemini.url, "--bootstrap", "20"]) == 0
    assert "--teacher gemini is deprecated" in capsys.readouterr().err  # the old flag still works, with a warning
    res = _strict_json(cli_out / "results.json")
    assert res["kind"] == "gemini" and list(res["metrics"]) == ["parsed"]
    assert res["provenance"]["settings"]["decoding"]["temperature"] == 0.0


@pytest.mark.parametrize("text, anchor", [
    ("Score: 1.0\nReasoning: Mild noise. Overall quality is fair; confidence is reduced.", 2),
    ("The image is of poor diagnostic quality.", 1),
    ("Overall image quality is good; diagnosis is only slightly limited.", 3),
    ("**Excellent** overall image quality.".replace("**", ""), 4),
    ("Non-diagnostic quality due to dense streaks.", 0),
    ("Quality remains only fair.", 2),
    ("Good soft-tissue contrast, but heavy noise.", None),  # "good" not about the overall quality
    ("The quality is not good.", None),  # negated
    ("Noise is moderate. Initially good quality, but overall the image quality is poor.", 1),  # the last wins
    ("", None),
])
def test_stated_quality(text, anchor):
    from ctiqa.explanations import stated_quality

    assert stated_quality(text) == anchor


def test_quality_consistency_brackets_the_score():
    from ctiqa.explanations import quality_consistency

    rc = quality_consistency([(1.0, "Overall quality is fair."),  # 1.0 is bracketed by poor only: disagrees
                              (2.6, "Overall quality is fair."), (2.6, "Overall quality is good."),  # both agree
                              (3.9, "Poor image quality."),  # disagrees
                              (2.0, "Mild noise only."),  # states nothing
                              (None, "Overall quality is good."),  # no parsed score: not counted
                              (3.0, None)])
    assert (rc["n_rationales"], rc["n_stated"]) == (5, 4)
    assert rc["stated_rate"] == 0.8 and rc["consistent_rate"] == 0.5


# ------------------------------------------------------------------------------------------ failures look like failures
@pytest.mark.parametrize("line, what", [
    ('{"id": "0001", "score": 2.6, "prediction": NaN}', "'prediction' must be a number in [0, 4]"),
    ('{"id": "0001", "score": 2.6, "prediction": Infinity}', "got Infinity"),
    ('{"id": "0001", "score": 2.6, "prediction": -Infinity}', "got -Infinity"),
    ('{"id": "0001", "score": 2.6, "prediction": true}', "got true"),
    ('{"id": "0001", "score": 2.6, "prediction": 4.5}', "got 4.5"),
    ('{"id": "0001", "score": 2.6, "prediction": -0.1}', "got -0.1"),
    ('{"id": "0001", "score": 2.6, "prediction": "3"}', 'got "3"'),
    ('{"id": "0001", "score": NaN, "prediction": 2.0}', "'score' must be"),
    ('{"id": "0001", "score": 7, "prediction": 2.0}', "'score' must be"),
    ('{"id": "0001", "score": 2.6, "prediction": 2.0, "prob_score": 9}', "'prob_score' must be"),
])
def test_predictions_file_bad_values_refused_up_front(dataset, tmp_path, capsys, line, what):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "0000", "score": 3.8, "prediction": 3.0}\n' + line + "\n")
    out = tmp_path / "out"
    assert ctiqa_main(["evaluate", "--predictions", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{f} line 2:" in err and what in err, err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written (no 0-byte temp file)


def test_no_usable_score_exits_nonzero_and_out_file_refused(dataset, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert ctiqa_main(["evaluate", "--predictions", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "holds no rows" in capsys.readouterr().err
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text("".join(json.dumps({"id": f"{i:04d}", "score": s, "text": "I cannot rate this image."}) + "\n"
                             for i, (_, _, s) in enumerate(LADDER)))
    out = tmp_path / "n"
    assert ctiqa_main(["evaluate", "--predictions", str(nulls), "--out", str(out), "--bootstrap", "0"]) == 1
    assert "no sample has a usable score" in capsys.readouterr().err
    res = _strict_json(out / "results.json")  # the results are still written, to look at
    assert res["failures"] == {"connection": 0, "api": 0, "no_score": N, "missing": 0}
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    assert ctiqa_main(["evaluate", "--predictions", str(nulls), "--dataset", str(tmp_path / "no-such-dataset"),
                       "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"


def _fake_openai(answers):
    """An OpenAI-compatible chat server answering the n-th request with answers[n] ((status, body) pairs)."""
    from ctiqa.testing.loopback import send_json, start_server

    requests = []

    def dispatch(h):
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        requests.append(body)
        status, payload = answers[min(len(requests), len(answers)) - 1]
        send_json(h, status, payload)

    return start_server(dispatch), requests


def _chat(content, finish="stop"):
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": finish}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                   "total_tokens": 2}}


def test_api_openai_zero_shot_counts_api_errors_apart_from_parse_failures(dataset, tmp_path, capsys):
    from ctiqa.testing.loopback import stop_server

    server, requests = _fake_openai([
        _chat('{"score": 3.4, "reasoning": "sharp edges"}'), _chat("Score: 2,6"),
        (400, {"error": {"message": "image too large", "type": "invalid_request_error"}}),
        _chat("Score: 1.", "length"), _chat("I cannot assess medical images."), _chat("Quality (0-4): 1")])
    out = tmp_path / "openai"
    try:
        rc = ctiqa_main(["evaluate", "--api", "openai", "--model", "local-vlm", "--dataset", str(dataset),
                         "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--out", str(out),
                         "--concurrency", "1", "--bootstrap", "0"])
    finally:
        stop_server(server)
    assert rc == 0
    assert len(requests) == N and requests[0]["temperature"] == 0.0 and requests[0]["model"] == "local-vlm"
    res = _strict_json(out / "results.json")
    assert res["kind"] == "openai" and res["provenance"]["model"]["api"] == "openai"
    assert res["failures"] == {"connection": 0, "api": 1, "no_score": 1, "missing": 0}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["parsed_score"] for r in rows] == [3.4, 2.6, None, 1.0, None, 1.0]
    assert rows[2]["error"].startswith("http_400") and rows[3]["error"] == "finish_reason: length"
    assert "1 API errors, 1 answers without a score" in capsys.readouterr().out
    md = tmp_path / "report.md"
    assert ctiqa_main(["report", str(out), "--out", str(md), "--bootstrap", "0"]) == 0
    assert "| local-vlm (zero-shot) | parsed | 4 / 6 (67%) | 2 (1 api, 1 no score) |" in md.read_text()


def _preds_file(path: Path, shift: float = 0.0) -> Path:
    rows = [{"id": f"{i:04d}", "score": s, "prediction": min(4.0, max(0.0, s + shift))}
            for i, s in enumerate([0.5, 1.5, 2.5, 3.5])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_never_overwrites_its_own_input(tmp_path, capsys):
    """QA #63: `evaluate --predictions OUT/predictions.jsonl --out OUT` replaced the user's input with its own
    rows. Refused before any work; the input's bytes are unchanged."""
    out = tmp_path / "run"
    out.mkdir()
    f = _preds_file(out / "predictions.jsonl")
    before = f.read_bytes()
    assert ctiqa_main(["evaluate", "--predictions", str(f), "--out", str(out), "--bootstrap", "0"]) == 2
    assert "input" in capsys.readouterr().err
    assert f.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["predictions.jsonl"]


def test_evaluate_refuses_an_out_holding_another_evaluation(tmp_path, capsys):
    """QA #62: an --out holding another run's evaluation was silently replaced. Refused naming what differs; the
    same run re-runs; --overwrite moves the old results.json and predictions.jsonl aside (nothing deleted)."""
    a, b = _preds_file(tmp_path / "a.jsonl"), _preds_file(tmp_path / "b.jsonl", shift=0.3)
    out = tmp_path / "run"
    assert ctiqa_main(["evaluate", "--predictions", str(a), "--out", str(out), "--bootstrap", "0"]) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".jsonl")}
    capsys.readouterr()
    assert ctiqa_main(["evaluate", "--predictions", str(b), "--out", str(out), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "source" in err and "a.jsonl" in err and "b.jsonl" in err
    assert {n: (out / n).read_bytes() for n in kept} == kept
    assert ctiqa_main(["evaluate", "--predictions", str(a), "--out", str(out), "--bootstrap", "0"]) == 0  # same run
    assert ctiqa_main(["evaluate", "--predictions", str(b), "--out", str(out), "--bootstrap", "0",
                       "--overwrite"]) == 0
    assert "moved the previous evaluation" in capsys.readouterr().err
    backups = sorted(out.glob("*.bak.*"))
    assert [p.name.split(".")[0] for p in backups] == ["predictions", "results"]
    assert json.loads(next(p for p in backups if p.name.startswith("results")).read_text())["provenance"][
        "settings"]["source"] == str(a)


def test_a_smaller_limit_never_rewrites_a_finished_evaluation(tmp_path, capsys):
    """QA round 3: the same run with `--limit 1` into a finished --out rewrote predictions.jsonl with 1 row and
    replaced results.json (the rest lost). Refused, bytes unchanged; --overwrite moves the old files aside."""
    a = _preds_file(tmp_path / "a.jsonl")
    out = tmp_path / "run"
    assert ctiqa_main(["evaluate", "--predictions", str(a), "--out", str(out), "--bootstrap", "0"]) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".jsonl")}
    capsys.readouterr()
    assert ctiqa_main(["evaluate", "--predictions", str(a), "--out", str(out), "--bootstrap", "0",
                       "--limit", "1"]) == 2
    assert "--limit 1 would rewrite it" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in kept} == kept
    assert ctiqa_main(["evaluate", "--predictions", str(a), "--out", str(out), "--bootstrap", "0",
                       "--limit", "1", "--overwrite"]) == 0
    assert sorted(p.name.split(".")[0] for p in out.glob("*.bak.*")) == ["predictions", "results"]


def test_report_never_writes_over_an_evaluation_or_a_users_file(tmp_path, capsys):
    """QA #67/#68: `ctiqa report RUN --out RUN/results.json` replaced the evaluation with markdown, and --out a
    folder gave a traceback. Both refused with one line before any work (bytes unchanged); a user's own file too;
    an earlier report is replaced."""
    run = tmp_path / "run"
    assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / "a.jsonl")), "--out", str(run),
                       "--bootstrap", "0"]) == 0
    mine = tmp_path / "notes.md"
    mine.write_text("my notes\n")
    kept = {p: p.read_bytes() for p in (run / "results.json", run / "predictions.jsonl", mine)}
    capsys.readouterr()
    for out in (run / "results.json", run / "predictions.jsonl", mine, run):
        assert ctiqa_main(["report", str(run), "--out", str(out), "--bootstrap", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert {p: p.read_bytes() for p in kept} == kept
    md = tmp_path / "report.md"
    assert ctiqa_main(["report", str(run), "--out", str(md), "--bootstrap", "0"]) == 0
    assert ctiqa_main(["report", str(run), "--out", str(md), "--bootstrap", "0"]) == 0  # our own report: replaced


def test_absent_ids_are_missing_not_parse_failures(dataset, tmp_path, capsys):
    """QA #53: a predictions file with some of the split's ids said "N ... missing (parse failures)". Absent ids
    are counted as missing, an answer without a score as a parse failure, in results.json and on the console."""
    f = tmp_path / "few.jsonl"
    rows = [{"id": "0000", "prediction": 3.5}, {"id": "0001", "prediction": 2.5}, {"id": "0002", "prediction": 2.0},
            {"id": "0003", "text": "The image looks fine to me."}]  # 0004, 0005 absent
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "few"
    assert ctiqa_main(["evaluate", "--predictions", str(f), "--dataset", str(dataset), "--out", str(out),
                       "--bootstrap", "0"]) == 0
    res = _strict_json(out / "results.json")
    assert res["failures"] == {"connection": 0, "api": 0, "no_score": 1, "missing": 2}
    text = capsys.readouterr().out + json.dumps(res["metrics"])
    assert "1 answers without a score (parse failures)" in text and "2 missing (no prediction for the id)" in text
    assert "3 of 6 predictions are missing (parse failures)" not in text and "(parse failures)" not in json.dumps(
        res["metrics"])


def test_a_users_plot_in_out_is_never_replaced(tmp_path, capsys):
    """QA round 3: `evaluate --out` into a folder holding the user's own scatter.png replaced it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "scatter.png").write_bytes(b"my plot")
    assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / "a.jsonl")), "--out", str(out),
                       "--bootstrap", "0"]) == 2
    assert "scatter.png" in capsys.readouterr().err and (out / "scatter.png").read_bytes() == b"my plot"


def _ladder_preds(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"{i:04d}", "score": s, "prediction": min(4.0, s + 0.2)}) + "\n"
                            for i, (_, _, s) in enumerate(LADDER)))
    return path


def test_the_same_dataset_spelt_otherwise_is_the_same_run(dataset, tiny, tmp_path, monkeypatch, capsys):
    """QA round 4: `--dataset /abs/ds` then `--dataset ds` (or ./ds, or a symlink to it) into the same --out was
    refused as "another run". Local paths are compared resolved (results written before paths were recorded too),
    a model run resumes its rows (nothing asked again); another folder, even spelt the same, is still another run."""
    import shutil

    monkeypatch.chdir(dataset.parent)
    (dataset.parent / "link").symlink_to(dataset, target_is_directory=True)
    f = _ladder_preds(tmp_path / "a.jsonl")
    out = tmp_path / "run"
    base = ["evaluate", "--predictions", str(f), "--out", str(out), "--bootstrap", "0", "--dataset"]
    assert ctiqa_main([*base, str(dataset)]) == 0
    for spelling in (dataset.name, f"./{dataset.name}", "link", f"../{dataset.parent.name}/{dataset.name}"):
        assert ctiqa_main([*base, spelling]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())  # as written before provenance.local_paths existed
    del res["provenance"]["local_paths"]
    (out / "results.json").write_text(json.dumps(res))
    assert ctiqa_main([*base, "./link"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    other = shutil.copytree(dataset, tmp_path / "copy")
    assert ctiqa_main([*base, str(other)]) == 2 and "another run" in capsys.readouterr().err
    # the same relative name from another folder is another dataset (recorded absolute path)
    monkeypatch.chdir(tmp_path)
    assert ctiqa_main([*base, os.path.relpath(dataset)]) == 0, capsys.readouterr().err  # from here, the same one
    assert json.loads((out / "results.json").read_text())["provenance"]["local_paths"] == {
        "source": os.path.realpath(f), "dataset": os.path.realpath(dataset)}
    (tmp_path / "data").symlink_to(other, target_is_directory=True)
    assert ctiqa_main([*base, "data"]) == 2 and "another run" in capsys.readouterr().err

    # a model run spelt otherwise resumes every row (the model is not even loaded)
    monkeypatch.chdir(dataset.parent)
    out = tmp_path / "model-run"
    argv = ["evaluate", "--model", str(tiny), "--out", str(out), "--score-only", "--bootstrap", "0", "--dataset"]
    assert ctiqa_main([*argv, str(dataset)]) == 0
    assert ctiqa_main([*argv, f"./{dataset.name}/"]) == 0
    assert json.loads((out / "results.json").read_text())["provenance"]["model"]["resumed_rows"] == N
    assert not list(out.glob("*.bak*"))


def test_out_inside_the_dataset_folder_is_refused(dataset, tmp_path, capsys):
    """QA round 4: `evaluate --out DATASET` (or a folder inside it) wrote results.json, predictions.jsonl and plots
    into a Hub-publishable dataset folder. Refused with one line before any work, the folder unchanged; a folder
    marked by build-dataset (.ctiqa-dataset.json) is refused even when the dataset is not given."""
    f = _ladder_preds(tmp_path / "a.jsonl")
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    for out in (dataset, dataset / "data", dataset / "eval"):
        assert ctiqa_main(["evaluate", "--predictions", str(f), "--dataset", str(dataset), "--out", str(out),
                           "--bootstrap", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "dataset folder" in err and str(dataset) in err
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before
    from ctiqa.paths import DATASET_MARKER

    marked = tmp_path / "built"
    marked.mkdir()
    (marked / DATASET_MARKER).write_text('{"tool": "ctiqa build-dataset", "files": []}')
    assert ctiqa_main(["evaluate", "--predictions", str(f), "--out", str(marked / "eval"), "--bootstrap", "0"]) == 2
    assert "inside the dataset folder" in capsys.readouterr().err and not (marked / "eval").exists()
    assert ctiqa_main(["evaluate", "--predictions", str(f), "--dataset", str(dataset), "--out",
                       str(tmp_path / "beside"), "--bootstrap", "0"]) == 0  # beside it: fine


def test_report_of_one_folder_twice_lists_it_once(tmp_path, monkeypatch, capsys):
    """QA round 4: `ctiqa report A A` (or A and ./A/, or a symlink to A) compared a row with itself (a paired test
    with a difference of exactly 0). Each folder is reported once, however spelt, with a warning on stderr."""
    monkeypatch.chdir(tmp_path)
    for name, shift in (("a", 0.0), ("b", 0.3)):
        assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / f"{name}.jsonl", shift)),
                           "--out", name, "--bootstrap", "0"]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    capsys.readouterr()
    md = tmp_path / "report.md"
    assert ctiqa_main(["report", "a", str(tmp_path / "a"), "./a/", "b", "link", "--names", "A", "A2", "A3", "B",
                       "A4", "--out", str(md), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("reported once") == 3 and "./a/ is a again" in err
    text = md.read_text()
    assert "| A | parsed |" in text and "| B | parsed |" in text
    assert not any(n in text for n in ("A2", "A3", "A4"))
    paired = text.split("## Paired comparison with A")[1]
    assert paired.count("| parsed |") == 1 and "| B | parsed | 4 |" in paired  # A is the reference, not a row


def test_report_names_a_tie_as_a_tie_and_escapes_table_cells(tmp_path, monkeypatch, capsys):
    """QA round 4: two rows with the same SRCC: one was named "Highest SRCC"; a name holding `|` shifted every cell
    of its table row."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / f"{name}.jsonl", 0.1)),
                           "--out", name, "--bootstrap", "0"]) == 0
    md = tmp_path / "r.md"
    assert ctiqa_main(["report", "a", "b", "--names", "good|0.999", "B", "--out", str(md), "--bootstrap", "0"]) == 0
    text = md.read_text()
    assert "Highest SRCC: **good\\|0.999** (parsed) and **B** (parsed) (a tie)" in text, text
    row = next(line for line in text.splitlines() if line.startswith("| good"))
    assert row.replace("\\|", "").count("|") == text.splitlines()[2].count("|")  # as many cells as the header


def test_report_refuses_rows_evaluated_against_other_reference_scores(tmp_path, monkeypatch, capsys):
    """QA round 4: `report` of evaluations on two different datasets whose ids overlap compared them "on the common
    ids", i.e. different images. Common ids with different true scores are refused in one line."""
    monkeypatch.chdir(tmp_path)
    a = _preds_file(tmp_path / "a.jsonl")
    b = tmp_path / "b.jsonl"
    b.write_text(a.read_text().replace('"score": 1.5', '"score": 3.0'))
    for name, f in (("a", a), ("b", b)):
        assert ctiqa_main(["evaluate", "--predictions", str(f), "--out", name, "--bootstrap", "0"]) == 0
    assert ctiqa_main(["report", "a", "b", "--out", "r.md", "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "give 1 of their 4 common ids different reference scores (id 0001: 1.5 vs 3)" in err, err
    assert not (tmp_path / "r.md").exists()


def test_a_model_replaced_at_the_same_path_is_another_run(dataset, tiny, tmp_path, capsys):
    """Hostile QA: after another model was saved into the same --model folder, a re-run into the same --out kept
    the old model's rows and metrics in results.json (rc 0). The folder's weights are part of the run's identity
    (ctiqa.model_settings.weights_fingerprint): refused in one line with nothing changed; the unchanged model, and
    a results.json written before the weights were recorded, still resume every row."""
    import shutil

    from ctiqa.evaluation import run_key
    from ctiqa.tiny import build_tiny_model

    model = shutil.copytree(tiny, tmp_path / "model")
    out = tmp_path / "e"
    argv = ["evaluate", "--model", str(model), "--dataset", str(dataset), "--out", str(out), "--score-only",
            "--bootstrap", "0"]
    res, pred = out / "results.json", out / "predictions.jsonl"
    assert ctiqa_main(argv) == 0
    assert json.loads(res.read_text())["provenance"]["settings"]["model_weights"]
    old = [json.loads(line)["prob_score"] for line in pred.read_text().splitlines()]
    assert ctiqa_main(argv) == 0 and json.loads(res.read_text())["provenance"]["model"]["resumed_rows"] == N

    shutil.copytree(build_tiny_model(tmp_path / "other", seed=1), model, dirs_exist_ok=True)  # re-saved in place
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert ctiqa_main(argv) == 2
    err = capsys.readouterr().err
    assert "model weights: changed since the rows in results.json were scored" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert ctiqa_main([*argv, "--overwrite"]) == 0  # the old evaluation is moved aside, the new model scored
    new = [json.loads(line)["prob_score"] for line in pred.read_text().splitlines()]
    assert new != pytest.approx(old, abs=1e-3) and json.loads(res.read_text())["provenance"]["model"].get(
        "resumed_rows", 0) == 0

    # an evaluation written before weights were recorded (its rows keyed without them) resumes as before
    results = json.loads(res.read_text())
    del results["provenance"]["settings"]["model_weights"]
    res.write_text(json.dumps(results))
    key = run_key(results["provenance"]["settings"])
    pred.write_text("".join(json.dumps({**json.loads(line), "run_key": key}) + "\n"
                            for line in pred.read_text().splitlines()))
    backups = sorted(out.glob("*.bak*"))
    assert ctiqa_main(argv) == 0
    assert json.loads(res.read_text())["provenance"]["model"]["resumed_rows"] == N
    assert sorted(out.glob("*.bak*")) == backups


def test_a_card_evaluation_must_be_of_the_weights_in_the_folder(dataset, tiny, tmp_path, capsys):
    """QA round 4: a training re-run put `output_dir/results.json` in its card whatever it evaluated (a predictions
    file's metrics were shown as the model's; earlier weights' too). Only an evaluation of the folder's current
    weights counts (ctiqa.evaluation.not_an_evaluation_of)."""
    import json
    import shutil
    import time

    from ctiqa.evaluation import not_an_evaluation_of

    model = shutil.copytree(tiny, tmp_path / "model")
    out = tmp_path / "e"
    assert ctiqa_main(["evaluate", "--model", str(model), "--dataset", str(dataset), "--out", str(out),
                       "--score-only", "--bootstrap", "0", "--limit", "4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert not_an_evaluation_of(results, model) is None
    assert "evaluated" in not_an_evaluation_of(results, tmp_path / "elsewhere")
    assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / "p.jsonl")), "--out",
                       str(tmp_path / "ep"), "--bootstrap", "0"]) == 0
    assert "not a model folder" in not_an_evaluation_of(json.loads((tmp_path / "ep" / "results.json").read_text()),
                                                        model)
    time.sleep(0.01)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())  # re-saved: more training
    assert "weights have changed" in not_an_evaluation_of(results, model)


def test_a_rebuilt_dataset_a_users_predictions_file_and_a_second_run_are_refused(dataset, tiny, tmp_path, capsys):
    """QA round 6: (1) the dataset at the same path rebuilt with other labels: evaluate resumed the old rows with
    the old labels (SRCC 0.5 reported, -0.5 true), exit 0; (2) a user's own predictions.jsonl in --out was moved
    aside and replaced without --overwrite; (3) two evaluations at once into one --out both said "wrote"."""
    import json

    from ctiqa.testing import lock_held_elsewhere

    out = tmp_path / "e"
    argv = ["evaluate", "--model", str(tiny), "--dataset", str(dataset), "--out", str(out), "--score-only",
            "--bootstrap", "0", "--limit", "3"]
    assert ctiqa_main(argv) == 0
    pred = out / "predictions.jsonl"
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    rows[1]["score"] = 4.0 - rows[1]["score"]  # as if the rows were scored against another build's labels
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = pred.read_bytes()
    assert ctiqa_main(argv) == 2
    assert "were scored against other reference scores" in capsys.readouterr().err
    assert pred.read_bytes() == before
    assert ctiqa_main([*argv, "--overwrite"]) == 0  # starts over, the old rows kept aside
    assert list(out.glob("predictions.*.bak.jsonl"))

    mine = tmp_path / "u"
    mine.mkdir()
    (mine / "predictions.jsonl").write_text('{"x": "mine"}\n')
    assert ctiqa_main([*argv[:5], "--out", str(mine), "--score-only", "--bootstrap", "0", "--limit", "3"]) == 2
    assert "holds a predictions.jsonl that no ctiqa evaluation wrote" in capsys.readouterr().err
    assert (mine / "predictions.jsonl").read_text() == '{"x": "mine"}\n' and len(list(mine.iterdir())) == 1

    with lock_held_elsewhere(tmp_path / "busy"):
        assert ctiqa_main([*argv[:5], "--out", str(tmp_path / "busy"), "--score-only", "--limit", "3"]) == 2
    assert "another ctiqa evaluate run is writing it" in capsys.readouterr().err


def test_report_and_html_refuse_predictions_changed_since_the_metrics(tmp_path, monkeypatch, capsys):
    """QA round 7: with predictions.jsonl reversed (or cut to half) after evaluate, report and html still showed
    results.json's SRCC 0.926 for rows whose SRCC is -0.926, exit 0. The metrics record the file they came from."""
    monkeypatch.chdir(tmp_path)
    assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / "p.jsonl", 0.2)), "--out", "a",
                       "--bootstrap", "0"]) == 0
    assert ctiqa_main(["report", "a", "--out", "r.md", "--bootstrap", "0"]) == 0
    pred = tmp_path / "a" / "predictions.jsonl"
    pred.write_text("".join(pred.read_text().splitlines(keepends=True)[:2]))
    capsys.readouterr()
    assert ctiqa_main(["report", "a", "--out", "r2.md", "--bootstrap", "0"]) == 2
    assert "changed since results.json was computed from it" in capsys.readouterr().err
    assert ctiqa_main(["html", "a", "--out", "a.html"]) == 2
    assert "changed since results.json" in capsys.readouterr().err and not (tmp_path / "a.html").exists()


def test_a_predictions_file_edited_in_place_is_another_run(tmp_path, monkeypatch, capsys):
    """QA round 8: re-evaluating a predictions file edited in place into the same --out silently replaced the
    evaluation of its earlier content (the path was the run's only identity). Refused; --overwrite moves it aside;
    the unchanged file still re-runs."""
    monkeypatch.chdir(tmp_path)
    p = _preds_file(tmp_path / "p.jsonl", 0.2)
    args = ["evaluate", "--predictions", str(p), "--out", "a", "--bootstrap", "0"]
    assert ctiqa_main(args) == 0 and ctiqa_main(args) == 0  # the same content: the same run
    before = (tmp_path / "a" / "results.json").read_bytes()
    _preds_file(p, -0.3)
    capsys.readouterr()
    assert ctiqa_main(args) == 2
    assert "predictions file: its content changed" in capsys.readouterr().err
    assert (tmp_path / "a" / "results.json").read_bytes() == before
    assert ctiqa_main([*args, "--overwrite"]) == 0
    assert any(f.read_bytes() == before for f in (tmp_path / "a").glob("results.*.bak.json"))


def test_an_evaluation_of_a_predictions_file_fed_back_gives_the_same_metrics(tmp_path, monkeypatch):
    """An evaluate output is a predictions file (README); the rows of a --predictions run hold the given score as
    parsed_score (rule "given", no text), which was read back as no score at all (exit 1). Also: --out that is a
    symbolic link to a folder not yet made (it was "File exists")."""
    monkeypatch.chdir(tmp_path)
    assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / "p.jsonl", 0.2)), "--out", "a",
                       "--bootstrap", "0"]) == 0
    (tmp_path / "link").symlink_to(tmp_path / "not-yet" / "b")
    assert ctiqa_main(["evaluate", "--predictions", "a/predictions.jsonl", "--out", "link", "--bootstrap", "0"]) == 0
    first, again = (json.loads((tmp_path / d / "results.json").read_text())["metrics"]["parsed"]
                    for d in ("a", "not-yet/b"))
    assert (again["srcc"], again["mae"], again["n_valid"]) == (first["srcc"], first["mae"], 4)


def test_report_and_html_name_a_results_json_that_is_not_one(tmp_path, monkeypatch, capsys):
    """QA round 8: results.json holding `null`, or a metric that is a string, ended report and html in a
    traceback."""
    monkeypatch.chdir(tmp_path)
    assert ctiqa_main(["evaluate", "--predictions", str(_preds_file(tmp_path / "p.jsonl", 0.2)), "--out", "a",
                       "--bootstrap", "0"]) == 0
    res = tmp_path / "a" / "results.json"
    good = json.loads(res.read_text())
    for bad, field in ((None, "$:"), ({**good, "metrics": {**good["metrics"], "parsed": {
            **good["metrics"]["parsed"], "srcc": "high"}}}, "$.metrics.parsed.srcc")):
        res.write_text(json.dumps(bad))
        capsys.readouterr()
        assert ctiqa_main(["report", "a", "--out", "r.md", "--bootstrap", "0"]) == 2
        assert ctiqa_main(["html", "a", "--out", "a.html"]) == 2
        err = capsys.readouterr().err
        assert err.count("not a ctiqa evaluate result") == 2 and field in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["report", "x", "--out", "r.md", "--seed", "-3"],
                                  ["report", "x", "--out", "r.md", "--bootstrap", "-5"],
                                  ["simulate", "--out", "s", "--seed", "-1"],
                                  ["build-dataset", "--ldctiqa", "x", "--out", "d", "--seed", "-1"]])
def test_negative_seeds_and_resample_counts_are_one_usage_line(argv, tmp_path, monkeypatch, capsys):
    """QA round 7: these ended in numpy/scipy tracebacks after the work had started."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        ctiqa_main(argv)
    assert e.value.code == 2 and "must be 0 or more" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_move_aside_never_replaces_an_existing_backup(tmp_path, monkeypatch, capsys):
    """QA round 8: `evaluate --overwrite` twice within one second (or over a user's file of that name) replaced the
    earlier `results.<UTC time>.bak.json`; each one is kept now."""
    import time

    from ctiqa.paths import move_aside

    monkeypatch.setattr(time, "gmtime", lambda *a: time.struct_time((2026, 12, 2, 9, 44, 31, 2, 336, 0)))
    taken = tmp_path / "results.20261202-094431.bak.json"
    taken.write_text('{"precious": 1}')
    for k in range(2):
        (tmp_path / "results.json").write_text(f'{{"run": {k}}}')
        move_aside([tmp_path / "results.json"], "evaluation")
    assert taken.read_text() == '{"precious": 1}'
    kept = sorted(p.read_text() for p in tmp_path.glob("results.*.bak.json"))
    assert kept == ['{"precious": 1}', '{"run": 0}', '{"run": 1}']


def test_report_caption_names_each_evaluations_resamples_when_they_differ(tmp_path, monkeypatch):
    """QA round 10: the caption said "(1000 resamples, seeded)" from the first folder for every row, although
    another folder's intervals came from 50 resamples."""
    monkeypatch.chdir(tmp_path)
    p = _preds_file(tmp_path / "p.jsonl", 0.2)
    for name, nb in (("a", "20"), ("b", "30")):
        assert ctiqa_main(["evaluate", "--predictions", str(p), "--out", name, "--bootstrap", nb, "--name", name]) == 0
    assert ctiqa_main(["report", "a", "b", "--out", "r.md", "--bootstrap", "0"]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "a: 95%, 20 resamples; b: 95%, 30 resamples" in md and "(20 resamples, seeded)" not in md
    assert ctiqa_main(["report", "a", "a", "--out", "s.md", "--bootstrap", "0"]) == 0
    assert "95% percentile-bootstrap intervals (20 resamples, seeded)" in (tmp_path / "s.md").read_text()


def test_an_evaluation_on_the_split_the_model_was_trained_on_is_warned(dataset, tiny, tmp_path, capsys):
    """QA round 9, row 114: a model trained on the test split (`--dataset_train_split test`, accepted by older ctiqa)
    was evaluated on that split and reported as held out, without a word. Its training record
    (ctiqa_run.json, beside the model) names the split: the evaluation says so under the table and in every score
    kind's warnings in results.json. A copy of the dataset elsewhere is the same data; another split is not."""
    import shutil

    from ctiqa.model_settings import dataset_fingerprint
    from ctiqa.training import RUN_CONFIG_FILE

    model = shutil.copytree(tiny, tmp_path / "model")
    record = {"dataset_name": os.path.realpath(dataset), "dataset_train_split": "test",
              "dataset_files": dataset_fingerprint(str(dataset)), "recipe": "sft"}
    (model / RUN_CONFIG_FILE).write_text(json.dumps(record))
    out = tmp_path / "ev"
    assert ctiqa_main(["evaluate", "--model", str(model), "--dataset", str(dataset), "--split", "test", "--out",
                       str(out), "--score-only", "--limit", "4", "--bootstrap", "0"]) == 0
    warning = f"{model} was trained on split 'test' of this dataset ({RUN_CONFIG_FILE}: dataset_train_split): " \
              "these metrics are not a held-out evaluation"
    assert warning in _strict_json(out / "results.json")["metrics"]["probability"]["warnings"]
    assert "was trained on split 'test'" in " ".join(capsys.readouterr().out.split())
    from ctiqa.evaluation import trained_on_split

    copy = shutil.copytree(dataset, tmp_path / "copy")
    assert trained_on_split(str(model), str(copy), "test") == warning
    assert trained_on_split(str(model), str(dataset), "validation") is None
    assert trained_on_split(str(tiny), str(dataset), "test") is None  # no training record: nothing to say
    (model / RUN_CONFIG_FILE).write_text(json.dumps({**record, "dataset_files": None}))  # an older record: by path
    assert trained_on_split(str(model), str(dataset), "test") == warning
    assert trained_on_split(str(model), str(copy), "test") is None


def test_a_model_is_evaluated_in_the_format_it_was_trained_on(tiny, dataset, tmp_path, capsys):
    """QA round 11: evaluate prompted with the dataset's format, not the model's recorded one (predict used the
    model's): a rationale-first model asked score-first failed to parse 4 of 4, with no note."""
    import shutil

    from ctiqa.model_settings import TrainedSettings, write_settings

    model = shutil.copytree(tiny, tmp_path / "model")
    write_settings(model, TrainedSettings(base_model="x", adapter=False, target_format="score-only"))
    out = tmp_path / "ev"
    assert ctiqa_main(["evaluate", "--model", str(model), "--dataset", str(dataset), "--out", str(out),
                       "--limit", "2", "--score-only", "--bootstrap", "0"]) in (0, 1)
    assert "trained on score-only answers, the dataset holds score-first" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["provenance"]["settings"]["format"] == "score-only"


def test_report_rows_of_folders_with_one_name_are_told_apart(tmp_path, monkeypatch):
    """QA round 12: runs/ft/model and runs/qlora/model were both "model" in every table, with no hint."""
    monkeypatch.chdir(tmp_path)
    p = _preds_file(tmp_path / "p.jsonl", 0.2)
    for d in ("ft", "qlora"):
        assert ctiqa_main(["evaluate", "--predictions", str(p), "--out", f"{d}/model", "--bootstrap", "0",
                           "--name", "model"]) == 0
    assert ctiqa_main(["report", "ft/model", "qlora/model", "--out", "r.md", "--bootstrap", "0"]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| model (ft/model) |" in md and "| model (qlora/model) |" in md


def test_an_html_page_inside_a_dataset_folder_is_refused(tmp_path, capsys):
    """QA round 10: `evaluate --out E --html DATASET/report.html` wrote into the dataset folder (its Hub upload),
    while --out there was refused."""
    from ctiqa.paths import DATASET_MARKER

    p = _preds_file(tmp_path / "p.jsonl", 0.2)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / DATASET_MARKER).write_text('{"tool": "ctiqa build-dataset", "files": []}')
    page = tmp_path / "ds" / "report.html"
    assert ctiqa_main(["evaluate", "--predictions", str(p), "--out", str(tmp_path / "e"), "--bootstrap", "0",
                       "--html", str(page)]) == 2
    assert "--html" in capsys.readouterr().err and not page.exists() and not (tmp_path / "e").exists()
