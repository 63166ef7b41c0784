"""``ctiqa export``: a LoRA adapter merged into its base scores as base + adapter does.

The base is a tiny Gemma 3 taught the answer format (tests/trained_tiny.py), the adapter a LoRA on every linear
layer, vision tower included (as the paper's recipe), with random B matrices so that merging changes the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctiqa import CTIQAError
from ctiqa.cli import main as ctiqa_main
from ctiqa.export import DONE_FILE, PARTIAL_MARKER, export_model
from ctiqa.inference import load_model, predict_images
from ctiqa.model_settings import SETTINGS_FILE, inference_precision, read_settings
from ctiqa.testing.sft_data import rows


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(trained_tiny_model):
    return trained_tiny_model


def make_adapter(base: Path, out: Path, *, std: float = 0.03, seed: int = 0,
                 training: dict | None = None) -> Path:
    """A LoRA adapter (r 4, all linear layers incl. the vision tower) with random B, saved like recipes/sft.py."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    net = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    (out / SETTINGS_FILE).write_text(json.dumps(training or {
        "base_model": str(base), "adapter": True, "load_in_4bit": False, "dtype": "float32"}))
    return out


@pytest.fixture(scope="module")
def adapter(trained, tmp_path_factory):
    return make_adapter(trained, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def images():
    return [r["images"][0] for r in rows(6, np.random.default_rng(7))]


def _predict(model=None, adapter=None, images=()):
    return predict_images(load_model(model and str(model), adapter and str(adapter), precision="fp32"),
                          images, max_new_tokens=40, batch_size=3)


def test_fp32_export_gives_identical_greedy_text_and_scores(trained, adapter, images, tmp_path):
    out = export_model(str(adapter), tmp_path / "merged", dtype="fp32")
    ref = _predict(adapter=adapter, images=images)
    got = _predict(model=out, images=images)
    base = _predict(model=trained, images=images)
    assert [p.text for p in got] == [p.text for p in ref]
    assert all(p.parsed_score is not None for p in got)
    np.testing.assert_allclose([p.prob_score for p in got], [p.prob_score for p in ref], atol=1e-4)
    # the adapter matters: without it the probability scores are different
    assert max(abs(a.prob_score - b.prob_score) for a, b in zip(base, ref, strict=True)) > 0.05
    # vision-tower LoRA was merged too (vLLM would drop it from an adapter)
    from safetensors.torch import load_file

    merged, orig = load_file(out / "model.safetensors"), load_file(trained / "model.safetensors")
    key = next(k for k in merged if "vision_tower" in k and "q_proj.weight" in k)
    assert not torch.equal(merged[key], orig[key])
    assert not any("lora" in k for k in merged)
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["adapter"] is False and settings["export"]["base_weights"] == "original"
    assert settings["export"]["training"]["adapter"] is True  # the adapter's own settings, for the record
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_bf16_export_scores_within_002(trained, adapter, images, tmp_path, capsys):
    assert ctiqa_main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "m16")]) == 0
    out = tmp_path / "m16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert inference_precision("auto", read_settings(out), "cpu") == ("bf16", "bfloat16")  # as saved
    ref = _predict(adapter=adapter, images=images)
    got = _predict(model=out, images=images)
    np.testing.assert_allclose([p.prob_score for p in got], [p.prob_score for p in ref], atol=0.02)
    # a re-run finds the finished export and leaves it alone
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert ctiqa_main(["export", "--adapter", str(adapter), "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert "already exported" in capsys.readouterr().err


def test_finished_export_is_reused_only_for_the_same_adapter_weights_and_base(trained, tmp_path, capsys,
                                                                          monkeypatch):
    """QA round 2 (H): a re-run with another --base-weights, or with a retrained adapter saved at the same path,
    said "already exported" and kept the old merge. Now refused naming what differs; the export is unchanged."""
    ad = make_adapter(trained, tmp_path / "lora", seed=3)
    out = tmp_path / "merged"
    assert ctiqa_main(["export", "--adapter", str(ad), "--out", str(out), "--dtype", "fp32"]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    # the same adapter spelt otherwise (relative to another folder) is the same export (QA round 4: refused)
    monkeypatch.chdir(tmp_path)
    assert ctiqa_main(["export", "--adapter", "./lora/", "--out", "merged", "--dtype", "fp32"]) == 0
    assert "already exported" in capsys.readouterr().err
    assert ctiqa_main(["export", "--adapter", str(ad), "--out", str(out), "--dtype", "fp32",
                       "--base-weights", "nf4"]) == 2
    err = capsys.readouterr().err
    assert "base_weights: 'original' then, 'nf4' now" in err, err
    make_adapter(trained, ad, seed=4)  # retrained, saved at the same path
    assert ctiqa_main(["export", "--adapter", str(ad), "--out", str(out), "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "adapter_sha256" in err and "already exported" not in err, err
    assert (out / "model.safetensors").read_bytes() == before


def test_qlora_adapter_merges_into_dequantised_nf4_base(trained, tmp_path, images):
    """An adapter trained on an NF4 base is merged into the NF4-rounded weights it learned against: the export
    scores closer to ``ctiqa evaluate --adapter`` (precision auto = that NF4 base) than a merge into the original
    base weights does."""
    pytest.importorskip("bitsandbytes")
    ad = make_adapter(trained, tmp_path / "qlora", training={"base_model": str(trained), "adapter": True,
                                                              "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                              "dtype": "bfloat16"})
    out = export_model(str(ad), tmp_path / "merged")
    assert json.loads((out / DONE_FILE).read_text())["base_weights"] == "nf4"
    merged = read_settings(out)  # a full bf16 model, not an adapter on a 4-bit base
    assert (merged.adapter, merged.load_in_4bit, merged.compute_dtype) == (False, False, "bfloat16")
    orig = export_model(str(ad), tmp_path / "orig", base_weights="original")
    ref = predict_images(load_model(adapter=str(ad)), images, generate=False)  # auto: the 4-bit base, bf16 compute
    got = predict_images(load_model(str(out), precision="bf16"), images, generate=False)
    alt = predict_images(load_model(str(orig), precision="bf16"), images, generate=False)
    err = max(abs(a.prob_score - b.prob_score) for a, b in zip(got, ref, strict=True))
    err_orig = max(abs(a.prob_score - b.prob_score) for a, b in zip(alt, ref, strict=True))
    # measured: 0.047 vs 0.100 (bf16 rounding of W + BA and bf16 compute account for the rest)
    assert err < 0.75 * err_orig


def test_qlora_fp32_export_loads_unquantised_and_scores_as_base_plus_adapter(trained, tmp_path, images):
    """QA (wrong result, exit 0): the export's settings were the adapter's (``adapter: true, load_in_4bit: true``),
    so ``ctiqa predict/evaluate --model merged`` with the default ``--precision auto`` quantised the merged model to
    NF4 again. Now the settings describe the merged model: auto loads it in the exported dtype and scores as
    base + adapter does; an export written by the old code is read the same way."""
    pytest.importorskip("bitsandbytes")
    qlora = {"settings_version": 2, "base_model": str(trained), "adapter": True, "load_in_4bit": True,
             "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "compute_dtype": "float32",
             "dtype": "float32", "encoding": "soft-tissue", "target_format": "score-first"}
    ad = make_adapter(trained, tmp_path / "qlora", training=qlora)
    assert ctiqa_main(["export", "--adapter", str(ad), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    out = tmp_path / "merged"
    ref_lm, got_lm = load_model(adapter=str(ad)), load_model(str(out))  # both --precision auto
    assert ref_lm.precision == "4bit"  # the adapter is evaluated on the NF4 base it learned on
    assert got_lm.precision == "fp32" and got_lm.compute_dtype == "float32"
    assert not any("4bit" in type(m).__name__ for m in got_lm.model.modules())
    # bitsandbytes on an AVX512-BF16 CPU repacks 4-bit weights for inference and computes in bf16 whatever the
    # compute dtype (bitsandbytes/nn/modules.py Linear4bit.forward): load_model turns that off for an fp32 compute
    # dtype (QA round 9: base + adapter differed from the fp32 export by 2e-3 on such a CPU)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in ref_lm.model.modules())
    ref = predict_images(ref_lm, images, generate=False)
    got = predict_images(got_lm, images, generate=False)
    np.testing.assert_allclose([p.prob_score for p in got], [p.prob_score for p in ref], atol=1e-4)
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["export"]["training"] == qlora
    assert (settings["encoding"], settings["target_format"]) == ("soft-tissue", "score-first")
    # an export written before: the adapter's settings copied, plus the export entry
    (out / SETTINGS_FILE).write_text(json.dumps({**qlora, "export": {k: v for k, v in settings["export"].items()
                                                                     if k != "training"}}))
    old = read_settings(out)
    assert (old.adapter, old.load_in_4bit, old.encoding) == (False, False, "soft-tissue")
    assert inference_precision("auto", old, "cuda:0") == ("fp32", "float32")


def test_bad_inputs_are_named_and_nothing_is_lost(trained, adapter, tmp_path, capsys):
    keep = tmp_path / "busy"
    keep.mkdir()
    (keep / "mine.txt").write_text("user file")
    assert ctiqa_main(["export", "--adapter", str(adapter), "--out", str(keep)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (keep / "mine.txt").read_text() == "user file"
    assert ctiqa_main(["export", "--adapter", str(trained), "--out", str(tmp_path / "x")]) == 2
    assert "full model" in capsys.readouterr().err
    assert ctiqa_main(["export", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_users_folder_named_out_partial_is_kept_and_a_link_out_is_followed(adapter, tmp_path, capsys):
    """QA round 4: export removed any OUT.partial folder as "our own interrupted export", a user's notes with it;
    `--out LINK` (a link to an empty folder) failed after the whole merge ("Not a directory"), leaving the merge
    behind. Only a folder with the export's marker is removed; a link is followed before any work."""
    mine = tmp_path / "exp.partial"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    assert ctiqa_main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "exp"), "--dtype", "fp32"]) == 2
    assert "not left by an interrupted ctiqa export" in capsys.readouterr().err
    assert (mine / "notes.md").read_text() == "mine" and not (tmp_path / "exp").exists()
    # an interrupted export's own folder is removed and the export completes
    (tmp_path / "done.partial").mkdir()
    (tmp_path / "done.partial" / PARTIAL_MARKER).write_text("")
    (tmp_path / "done.partial" / "model.safetensors").write_text("cut short by a kill")
    export_model(str(adapter), tmp_path / "done", dtype="fp32")
    assert not (tmp_path / "done.partial").exists() and not (tmp_path / "done" / PARTIAL_MARKER).exists()
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert ctiqa_main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "link"), "--dtype", "fp32"]) == 0
    assert (target / DONE_FILE).is_file() and (tmp_path / "link").is_symlink()


def test_a_relative_base_recorded_in_the_adapter_is_named_before_loading(adapter, tmp_path, monkeypatch, capsys):
    """QA round 4: an adapter whose base is a relative path (runs/demo/tiny-model), exported from another folder,
    failed with "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    moved = tmp_path / "lora"
    shutil.copytree(adapter, moved)
    cfg["base_model_name_or_path"] = "runs/demo/tiny-model"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    assert ctiqa_main(["export", "--adapter", str(moved), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "base model (recorded in the adapter's adapter_config.json; --model gives another) runs/demo/tiny-model: " \
           "no such folder" in err, err


def test_push_to_hub_uploads_the_merged_folder(adapter, tmp_path, fake_hub):
    out = export_model(str(adapter), tmp_path / "merged", push_to_hub="me/ctiqa-merged")
    files = set(fake_hub.files("me/ctiqa-merged", "model"))
    assert {"model.safetensors", "config.json", "tokenizer.json", SETTINGS_FILE, DONE_FILE} <= files
    assert fake_hub.repo("me/ctiqa-merged", "model").private
    assert out.is_dir()


def test_error_on_unknown_dtype(adapter, tmp_path):
    with pytest.raises(CTIQAError, match="dtype"):
        export_model(str(adapter), tmp_path / "o", dtype="fp8")


def test_an_adapter_loaded_onto_another_base_is_warned(trained, adapter, tmp_path):
    """QA round 13: an adapter was applied to whatever --model was given, without a word (other scores, exit 0)."""
    import warnings

    from ctiqa import CTIQAWarning
    from ctiqa.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=3)
    with pytest.warns(CTIQAWarning, match=rf"trained on {trained}; it is loaded onto {other}"):
        load_model(str(other), str(adapter), precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTIQAWarning)
        load_model(str(trained), str(adapter), precision="fp32")  # its own base: silent
        load_model(None, str(adapter), precision="fp32")
