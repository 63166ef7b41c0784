"""The tiny Gemma 3 VLM + processor (ctiqa.tiny): loads with the Auto classes and behaves like MedGemma's."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from ctiqa import prompts
from ctiqa.tiny import SPECIAL_TOKENS, build_tiny_model, count_parameters


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval(), AutoProcessor.from_pretrained(tiny_dir)


def _image(seed=0, shape=(100, 140)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), mode="RGB")


def test_auto_classes_load_gemma3(loaded):
    model, processor = loaded
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(processor).__name__ == "Gemma3Processor"
    counts = count_parameters(model)
    assert 150_000 < counts["total"] < 400_000, counts
    assert model.config.mm_tokens_per_image == processor.image_seq_length == 16
    assert model.config.vision_config.image_size == 128
    # the projector starts random (transformers initialises it to zero, which would hide the image)
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0
    emb = model.get_input_embeddings().weight
    assert 0.2 < float(emb.detach().std()) < 0.3


def test_special_tokens_match_config(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)  # Gemma 3's ids
    assert tok.boi_token == "<start_of_image>" and tok.eoi_token == "<end_of_image>"
    assert model.config.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids("<image_soft_token>")
    assert model.config.boi_token_index == tok.convert_tokens_to_ids("<start_of_image>")
    assert model.config.eoi_token_index == tok.convert_tokens_to_ids("<end_of_image>")
    assert model.generation_config.eos_token_id == [1, tok.convert_tokens_to_ids("<end_of_turn>")]


def test_digits_are_single_tokens_like_gemma(loaded):
    tok = loaded[1].tokenizer
    for d in "0123456789":
        assert len(tok.tokenize(d)) == 1
    assert tok.tokenize("Score: 2.2") == ["Score", ":", "▁", "2", ".", "2"]
    assert tok.tokenize("10.0 12345") == ["1", "0", ".", "0", "▁", "1", "2", "3", "4", "5"]
    # byte fallback: anything encodes and decodes back
    text = "Ödem — 5 mm, café ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_is_gemma3(loaded):
    processor = loaded[1]
    target = prompts.format_target(2.2, "Mild noise.", "score-first")
    text = processor.apply_chat_template(prompts.prompt_messages() + prompts.completion_messages(target),
                                         tokenize=False)
    assert text == ("<bos><start_of_turn>user\n<start_of_image>" + prompts.instruction() + "<end_of_turn>\n"
                    "<start_of_turn>model\nScore: 2.2\nReasoning: Mild noise.<end_of_turn>\n")
    prompt = processor.apply_chat_template(prompts.prompt_messages(), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n") and prompt.count("<bos>") == 1


def test_image_tokens_inserted_and_forward_runs(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    text = processor.apply_chat_template(prompts.prompt_messages(), tokenize=False, add_generation_prompt=True)
    enc = processor(text=text, images=[_image()], return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"][0].tolist()
    boi, eoi, img = (tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>"))
    start = ids.index(boi)
    assert ids[start + 1: start + 17] == [img] * 16 and ids[start + 17] == eoi
    assert ids.count(img) == 16 and ids.count(tok.bos_token_id) == 1
    assert enc["token_type_ids"][0].sum() == 16
    assert tuple(enc["pixel_values"].shape) == (1, 3, 128, 128)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    # the image reaches the output: another image changes the logits
    enc2 = processor(text=text, images=[_image(seed=1)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert not torch.allclose(model(**enc2).logits[0, -1], logits[0, -1])


def test_generation_stops_at_end_of_turn(loaded):
    model, processor = loaded
    text = processor.apply_chat_template(prompts.prompt_messages(), tokenize=False, add_generation_prompt=True)
    enc = processor(text=text, images=[_image()], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 5


def test_deterministic_and_seeded(tmp_path, tiny_dir):
    def digest(d):
        return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()

    assert digest(build_tiny_model(tmp_path / "a", seed=0)) == digest(tiny_dir)
    assert digest(build_tiny_model(tmp_path / "b", seed=1)) != digest(tiny_dir)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("sizes, message", [
    ({"mm_tokens_per_image": 15}, "perfect square"),
    ({"image_size": 128, "patch_size": 16, "mm_tokens_per_image": 9}, "average-pooled"),
    ({"text_hidden": 60, "text_heads": 8}, "divisible"),
    ({"patch_size": 0}, "patch_size=0"),  # QA round 4: ZeroDivisionError / a 0-layer model written with exit 0
    ({"vision_layers": 0, "text_layers": -1}, "vision_layers=0, text_layers=-1"),
    ({"image_size": 8, "patch_size": 8, "mm_tokens_per_image": 1}, "at least 16 px"),
])
def test_inconsistent_sizes_are_refused(tmp_path, sizes, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(tmp_path / "x", **sizes)


def test_cli_builds_a_loadable_model(tmp_path, capsys):
    from transformers import AutoProcessor

    from ctiqa.cli import main

    assert main(["tiny-model", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert "total" in capsys.readouterr().out
    assert AutoProcessor.from_pretrained(tmp_path / "m").image_seq_length == 16


def test_never_writes_over_a_trained_model_or_someone_elses_folder(tmp_path, capsys):
    """QA #84/#85: `ctiqa tiny-model --out` on a trained model folder replaced its weights with random ones while
    DONE and the card stayed. Now a non-empty folder that is not an earlier tiny model is refused, bytes unchanged;
    an earlier tiny model folder is rebuilt."""
    from ctiqa.cli import main

    trained = tmp_path / "trained"
    trained.mkdir()
    files = {"model.safetensors": b"trained weights", "DONE": b"", "README.md": b"# my model\n",
             "config.json": b"{}"}
    for name, data in files.items():
        (trained / name).write_bytes(data)
    assert main(["tiny-model", "--out", str(trained)]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "nothing was changed" in err
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == files
    # QA round 2: the same folder spelled through a folder that does not exist yet (`missing/../trained`)
    assert main(["tiny-model", "--out", str(tmp_path / "missing" / ".." / "trained")]) == 2
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == files and not (tmp_path / "missing").exists()
    again = tmp_path / "tiny"
    assert main(["tiny-model", "--out", str(again), "--seed", "1"]) == 0
    assert main(["tiny-model", "--out", str(again), "--seed", "1"]) == 0  # our own output: rebuilt
