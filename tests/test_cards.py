"""The model card of an SFT run (ctiqa.cards.model_card)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from ctiqa.cards import metric_rows, model_card

sys.path.insert(0, str(Path(__file__).parent))
from test_sft import sft  # noqa: E402  (the recipe script, loaded once)

PAPER = Path(__file__).resolve().parent.parent / "recipes" / "medgemma-4b-it" / "sft" / "config_qlora.yaml"


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_adapter_card_has_hub_metadata_recipe_and_evaluation(tmp_path):
    from ctiqa.evaluation import compute_metrics

    _, train, model = sft.parse_args(["--config", str(PAPER), "--use_cpu", "true",
                                      "--hub_model_id", "someone/medgemma-4b-ctiqa"])
    records = [{"score": s / 4, "parsed_score": s / 4 + 0.1 * (s % 3), "prob_score": s / 4 + 0.05,
                "parse_rule": "strict"} for s in range(16)]
    results = {"metrics": compute_metrics(records, n_bootstrap=200), "counts": {"n": 16}, "split": "test",
               "dataset": "someone/ldctiqa"}
    card = model_card(base_model="google/medgemma-4b-it", dataset="someone/ldctiqa", training_args=train,
                      model_args=model, adapter=True, eval_results=results)
    card.save(tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == "google/medgemma-4b-it" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["datasets"] == ["someone/ldctiqa"]
    assert meta["license"] == "other" and meta["license_name"] == "health-ai-developer-foundations"
    assert "Not for clinical use" in text and "Intended use" in text
    assert "QLoRA (4-bit NF4 base + LoRA)" in text and "| LoRA r / alpha / dropout | 16 / 16 / 0.05 |" in text
    assert "| learning rate | 0.0002 |" in text and "| schedule / warmup | linear / 0.03 |" in text
    assert 'PeftModel.from_pretrained(model, "someone/medgemma-4b-ctiqa")' in text
    rows = metric_rows(results)
    assert {(k, m) for k, m, _, _ in rows} >= {("parsed", "SRCC"), ("probability", "MAE")}
    srcc = results["metrics"]["probability"]["srcc"]
    assert f"| probability | SRCC | {srcc:.4f} |" in text
    assert "16 images of split `test`" in text


def test_full_model_card_without_evaluation_and_local_paths():
    tiny_cfg = PAPER.parent.parent.parent / "tiny" / "sft" / "config_cpu.yaml"
    _, train, model = sft.parse_args(["--config", str(tiny_cfg)])
    card = model_card(base_model="runs/demo/tiny-model", dataset="runs/demo/dataset", training_args=train,
                      model_args=model, adapter=False)
    meta = _front_matter(str(card))
    assert meta["library_name"] == "transformers" and "base_model" not in meta and "datasets" not in meta
    assert "license" not in meta  # not MedGemma: the card names the base model's licence in the text
    assert "full fine-tuning" in str(card) and "No evaluation was attached" in str(card)
    assert "It answers `Score: <x.x>` first" in str(card)  # score-first, the default format
    # QA round 11: rationale-first and score-only models were described as answering score first
    for fmt, says in (("rationale-first", "reasoning first, then `Score: <x.x>`"), ("score-only", "only, without")):
        text = str(model_card(base_model="b", dataset="d", training_args=train, model_args=model, adapter=False,
                              target_format=fmt))
        assert says in text and f'prompt_messages("{fmt}")' in text and "first, then the reasoning" not in text


def test_a_push_that_cannot_reach_the_hub_is_one_line_without_the_token():
    """QA round 4: `build-dataset --push-to-hub` with the Hub unreachable (offline mode, a closed port) ended in a
    traceback. Every push goes through ctiqa.cards.hub_push: one line naming the repo, never the token."""
    import socket

    from huggingface_hub import HfApi

    from ctiqa import CTIQAError
    from ctiqa.cards import hub_push

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    secret = "hf_" + "S3CRET" * 6
    with pytest.raises(CTIQAError) as err, hub_push("me/ds"):
        HfApi(endpoint=f"http://127.0.0.1:{port}", token=secret).create_repo("me/ds", repo_type="dataset")
    msg = str(err.value)
    assert msg.startswith("push to me/ds failed (") and "run the same command again" in msg
    assert secret not in msg and "\n" not in msg
