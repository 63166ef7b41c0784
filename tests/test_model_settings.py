"""Settings travel with the model (issue 10, item 4): what training used is written beside the adapter or model
(ctiqa.model_settings) and `ctiqa evaluate` / `ctiqa predict` load and render with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ctiqa.cli import main as cli
from ctiqa.model_settings import (
    SETTINGS_FILE,
    TrainedSettings,
    choose_encoding,
    dataset_encoding,
    inference_precision,
    read_settings,
    write_settings,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_settings_round_trip_and_the_old_form_is_still_read(tmp_path):
    s = TrainedSettings(base_model="google/medgemma-4b-it", adapter=True, load_in_4bit=True,
                        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, compute_dtype="bfloat16",
                        storage_dtype="bfloat16", dtype="bfloat16", bf16=True, encoding="medgemma-3window",
                        target_format="score-first", prompt_version="ctiqa-prompt-v1")
    write_settings(tmp_path, s)
    assert read_settings(tmp_path) == s
    # what recipes/sft.py wrote before settings_version 2 (the tiny QLoRA recipe: fp32 compute)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({
        "base_model": "runs/demo/tiny-model", "adapter": True, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "dtype": "float32", "bf16": False}))
    old = read_settings(tmp_path)
    assert old.settings_version == 1 and old.compute_dtype == "float32" and old.encoding is None
    assert inference_precision("auto", old, "cuda:0") == ("4bit", "float32")
    assert read_settings(tmp_path / "none") is None and read_settings(None) is None


def test_auto_precision_is_what_training_used():
    assert inference_precision("auto", None, "cpu") == ("fp32", "float32")
    assert inference_precision("auto", None, "cuda:0") == ("bf16", "bfloat16")
    full_fp32 = TrainedSettings(adapter=False, load_in_4bit=False, compute_dtype="float32")
    assert inference_precision("auto", full_fp32, "cuda:0") == ("fp32", "float32")
    qlora_bf16 = TrainedSettings(adapter=True, load_in_4bit=True, compute_dtype="bfloat16")
    assert inference_precision("auto", qlora_bf16, "cpu") == ("4bit", "bfloat16")
    assert inference_precision("bf16", full_fp32, "cpu") == ("bf16", "bfloat16")  # forced
    assert inference_precision("4bit", None, "cuda:0") == ("4bit", "bfloat16")  # the paper's default


def test_qlora_adapter_trained_with_fp32_compute_is_evaluated_with_fp32_compute(tiny, tmp_path):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from ctiqa.inference import load_model

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    base = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32, quantization_config=q)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    AutoProcessor.from_pretrained(tiny).save_pretrained(adapter)
    write_settings(adapter, TrainedSettings(base_model=str(tiny), adapter=True, load_in_4bit=True,
                                            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            compute_dtype="float32", storage_dtype="bfloat16", dtype="float32"))
    lm = load_model(str(adapter), precision="auto", device="cpu")
    layers = [m for m in lm.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert lm.precision == "4bit" and lm.compute_dtype == "float32" and len(layers) >= 20
    assert {m.compute_dtype for m in layers} == {torch.float32}  # not the bf16 the loader used to hard-code
    assert lm.describe()["trained_settings"]["compute_dtype"] == "float32"


def _dicom(folder: Path) -> Path:
    from pydicom.data import get_testdata_file

    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    return folder / "ct.dcm"


def test_predict_renders_in_the_encoding_the_model_was_trained_on(tiny, tmp_path, monkeypatch, caplog):
    """A model trained on medgemma-3window data is fed medgemma-3window pixels without being told; forcing
    soft-tissue is warned about."""
    import ctiqa.predict as predict

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    write_settings(model, TrainedSettings(adapter=False, load_in_4bit=False, compute_dtype="float32",
                                          encoding="medgemma-3window", target_format="score-first"))
    seen: list[str] = []
    render = predict.render

    def spy(img, encoding="soft-tissue", **kw):
        seen.append(encoding)
        return render(img, encoding, **kw)

    monkeypatch.setattr(predict, "render", spy)
    dcm = _dicom(tmp_path / "in")
    assert cli(["predict", str(dcm), "--model", str(model), "--score-only"]) == 0
    assert seen == ["medgemma-3window"]
    seen.clear()
    with caplog.at_level("WARNING", logger="ctiqa.model_settings"):
        assert cli(["predict", str(dcm), "--model", str(model), "--score-only", "--encoding", "soft-tissue"]) == 0
    assert seen == ["soft-tissue"]
    assert "trained on medgemma-3window images, but --encoding forces soft-tissue" in caplog.text


def test_untagged_models_keep_soft_tissue_and_evaluation_warns_on_a_dataset_mismatch(caplog):
    assert choose_encoding(None, None) == "soft-tissue"
    assert choose_encoding(None, TrainedSettings(encoding=None)) == "soft-tissue"
    with caplog.at_level("WARNING", logger="ctiqa.model_settings"):
        assert choose_encoding("soft-tissue", TrainedSettings(encoding="medgemma-3window"),
                               source="but the dataset's images are") == "soft-tissue"
    assert "trained on medgemma-3window images, but the dataset's images are soft-tissue" in caplog.text


def test_the_dataset_encoding_is_read_from_its_card(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("---\nlicense: other\n---\n\n- Images: rendered with encoding "
                                              "`medgemma-3window` (MedGemma's three windows); 8-bit RGB.\n")
    assert dataset_encoding(str(tmp_path / "a")) == "medgemma-3window"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("---\nctiqa:\n  encoding: soft-tissue\n---\n\nNo line.\n")
    assert dataset_encoding(str(tmp_path / "b")) == "soft-tissue"
    assert dataset_encoding(str(tmp_path / "missing")) is None


def test_the_model_card_quick_start_renders_with_the_training_encoding():
    from types import SimpleNamespace

    from ctiqa.cards import model_card

    train = SimpleNamespace(hub_model_id="me/m", bf16=False, learning_rate=1e-3, lr_scheduler_type="linear",
                            warmup_steps=0, num_train_epochs=1, max_steps=-1, per_device_train_batch_size=1,
                            gradient_accumulation_steps=1, world_size=1, max_grad_norm=1.0, weight_decay=0.0,
                            activation_checkpointing=False, max_length=None, load_best_model_at_end=False,
                            metric_for_best_model=None, seed=0)
    model = SimpleNamespace(load_in_4bit=False, dtype="float32", attn_implementation="sdpa")
    text = str(model_card(base_model="runs/demo/tiny-model", dataset="runs/demo/dataset", training_args=train,
                          model_args=model, adapter=False, encoding="medgemma-3window"))
    assert 'render("slice.dcm", "medgemma-3window")' in text and "`medgemma-3window`" in text


def test_the_dataset_fingerprint_is_the_content_of_the_data_files_load_dataset_reads(tmp_path):
    """QA round 9, rows 46/51/63: the fingerprint was the dates of every *.parquet/json/csv at any depth, so a
    byte-identical rebuild, or a run's own files written inside the dataset folder, "changed" the data of every run
    trained on it. Now: the bytes of the files load_dataset reads, nothing else."""
    import os

    from ctiqa.model_settings import DATASET_FINGERPRINT_PREFIX, dataset_data_files, dataset_fingerprint
    from ctiqa.testing.sft_data import write_dataset

    ds = write_dataset(tmp_path / "ds", {"train": 3, "validation": 2})
    files = dataset_data_files(ds)
    assert sorted(files) == ["train", "validation"]
    assert all(p.suffix == ".parquet" and p.parent == ds / "data" for ps in files.values() for p in ps)
    fp = dataset_fingerprint(ds)
    assert fp.startswith(DATASET_FINGERPRINT_PREFIX) and len(fp) == len(DATASET_FINGERPRINT_PREFIX) + 64
    train = files["train"][0]
    data = train.read_bytes()
    train.unlink()
    train.write_bytes(data)  # the identical rebuild: a new file, new dates
    os.utime(train, ns=(train.stat().st_mtime_ns + 10**9,) * 2)
    (ds / "audit.csv").write_text("id,flag\n")
    (ds / "model" / "checkpoint-2").mkdir(parents=True)  # a run inside (refused now; runs of older ctiqa exist)
    (ds / "model" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (ds / "model" / "config.json").write_text("{}")
    with open(ds / "README.md", "a") as f:
        f.write("\nmore card text\n")
    assert dataset_fingerprint(ds) == fp
    write_dataset(tmp_path / "ds", {"train": 3, "validation": 2}, seed=1)  # other rows at the same path
    assert dataset_fingerprint(ds) != fp
    assert dataset_fingerprint("someone/hub-dataset") is None and dataset_fingerprint(tmp_path / "nope") is None


def test_an_adapters_fingerprint_covers_its_local_base(tmp_path):
    """QA round 10: with --adapter alone (the base from adapter_config.json) a base re-saved in place was not seen:
    predict resumed and evaluate rewrote results.json from the old base's scores (exit 0)."""
    import json
    import os

    from ctiqa.model_settings import weights_fingerprint

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "model.safetensors").write_bytes(b"base weights")
    (base / "config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    before = weights_fingerprint(None, adapter)
    assert weights_fingerprint(None, adapter) == before
    os.utime(base / "model.safetensors", ns=(1, 1))  # re-saved in place
    assert weights_fingerprint(None, adapter) != before


def test_an_unset_4bit_storage_is_recorded_as_used_and_an_older_none_record_loads(tmp_path):
    """QA round 11: a QLoRA recipe without bnb_4bit_quant_storage recorded "storage_dtype": "None" (str(None)), and
    predict / evaluate / export of the adapter ended in `module 'torch' has no attribute 'None'`."""
    import json
    from types import SimpleNamespace

    from ctiqa.model_settings import BNB_DEFAULT_STORAGE, bnb_4bit_settings, read_settings
    from ctiqa.training import trained_settings

    margs = SimpleNamespace(model_name_or_path="m", dtype="float32", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            use_bnb_nested_quant=True, bnb_4bit_quant_storage=None)
    s = trained_settings(margs, SimpleNamespace(bf16=False), adapter=True, encoding=None, target_format=None,
                         prompt_version=None)
    assert s.storage_dtype == BNB_DEFAULT_STORAGE == "uint8"
    (tmp_path / "ctiqa_training.json").write_text(json.dumps({"settings_version": 2, "base_model": "m",
                                                              "adapter": True, "load_in_4bit": True,
                                                              "storage_dtype": "None", "compute_dtype": "float32"}))
    assert bnb_4bit_settings(read_settings(tmp_path), "float32")["bnb_4bit_quant_storage"] == "uint8"
