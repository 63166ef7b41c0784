"""A tiny Gemma 3 vision-language model + processor, built offline from config in well under a second.

It has MedGemma-4B's architecture class (``Gemma3ForConditionalGeneration``: SigLIP vision tower -> average-pooled
soft tokens -> RMS-normed linear projector -> Gemma 3 decoder) and its processor (``Gemma3Processor``: Gemma
tokenizer with Gemma 3's special tokens and chat template, Gemma 3 image processor), only small and random. Tests
train it for real on the CPU; ``make demo`` trains it to grade simulated CT crops.

What matches the real thing (so code that works here works on MedGemma):

- special tokens ``<pad> <eos> <bos> <unk> <mask> <start_of_turn> <end_of_turn> <start_of_image> <end_of_image>
  <image_soft_token>`` (pad 0, eos 1, bos 2 as in Gemma 3; the others get small ids here), registered as the
  tokenizer's ``boi_token`` / ``eoi_token`` / ``image_token`` and as the config's ``boi_token_index`` /
  ``eoi_token_index`` / ``image_token_index``;
- BPE with byte fallback and ``▁`` for spaces, digits always single tokens (SentencePiece ``split_digits`` in the
  real Gemma tokenizer), so ``"Score: 2.2"`` -> ``Score``, ``:``, ``▁``, ``2``, ``.``, ``2``: the evaluation reads
  the probabilities of the digit tokens ``0``-``4`` after ``"Score: "``;
- the Gemma 3 chat template (text of ``google/gemma-3-4b-it``'s ``chat_template.json``);
- generation stops at ``<eos>`` or ``<end_of_turn>`` (``eos_token_id`` ``[1, 106]`` in Gemma 3 / MedGemma).

What differs: sizes (defaults below), a vocabulary of a few hundred BPE pieces learned from a fixed corpus of
ctiqa's prompt texts and common CT-quality words (anything else falls back to bytes), and random weights with two
deliberate changes: the multimodal projector (zero at init in transformers, which would make the image invisible)
is random, and the token embeddings start at a larger scale (std ``embed_std``, default 0.25; with LoRA they stay
frozen, and a 0.02-std embedding leaves the tiny decoder nearly blind to the prompt).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.imaging import MIN_IMAGE_SIZE
from ctiqa.paths import check_output_path

#: Written first into every folder :func:`build_tiny_model` fills; a non-empty folder without it is never written.
MARKER_FILE = ".ctiqa-tiny-model"

#: Gemma 3 chat template: the text of ``chat_template.json`` in ``google/gemma-3-4b-it`` (also used by
#: ``google/medgemma-4b-it``). System text is folded into the first user turn; ``assistant`` is rendered ``model``;
#: an image item renders ``<start_of_image>``, which the processor expands into the full image block.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

#: Special tokens, in id order. pad/eos/bos/unk/mask take Gemma 3's ids 0-4; the turn and image tokens are 105,
#: 106, 255999, 256000 and 262144 in Gemma 3 and get the next small ids here.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

#: Words of CT image-quality reports, added to the BPE corpus beside ctiqa's prompt texts so typical rationales
#: tokenise into few pieces. Anything missing still encodes (byte fallback).
_RATIONALE_WORDS = (
    "The image shows mild moderate marked severe minimal slight substantial pronounced coarse fine grainy mottled "
    "noise texture streak streaks streaking artifacts artifact sharp sharpness blurred blurring crisp well defined "
    "poorly edges edge margins boundaries organ organs liver spleen kidney kidneys pancreas bowel vessels vessel "
    "aorta portal vein fat muscle bone spine soft tissue low contrast detectability lesion lesions conspicuity "
    "diagnostic confidence limited limits reduced adequate acceptable good excellent fair poor bad quality dose "
    "low-dose sparse-view views projection projections uniform homogeneous heterogeneous parenchyma attenuation "
    "visible obscured obscures degraded degrades preserved subtle fine detail details overall this slice is are "
    "with and of in the a to for but which that it its some no any only near throughout across central "
    "peripheral background region regions appear appears remains remain still allows allow supports "
    "interpretation reading structures structure small large high higher lower level levels rated score scores"
)


def _corpus() -> list[str]:
    """The fixed BPE training corpus: every prompt text of :mod:`ctiqa.prompts` plus report words and targets."""
    from ctiqa import prompts

    texts = [prompts.instruction(fmt) for fmt in prompts.TARGET_FORMATS]
    texts += [prompts.TEACHER_SYSTEM, prompts.teacher_prompt(2.0), _RATIONALE_WORDS]
    texts += [prompts.format_target(s / 5, "The image shows noise.", fmt)
              for s in range(21) for fmt in prompts.TARGET_FORMATS]
    texts += ["user\nmodel\nsystem"] * 20  # role names as the chat template writes them
    return texts


def build_tokenizer(vocab_size: int = 640):
    """Train a tiny Gemma-style BPE on :func:`_corpus` and wrap it as a ``GemmaTokenizer``.

    Args:
        vocab_size: total vocabulary size (special tokens + 256 byte tokens + BPE pieces); the BPE part may come
            out smaller when the corpus has fewer distinct merges.
    Returns:
        ``transformers.GemmaTokenizer`` with ``boi_token``/``eoi_token``/``image_token`` set and the Gemma 3
        chat template attached. Deterministic: the same corpus and size give the same vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    n_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed + 100:
        raise ValueError(f"vocab_size {vocab_size} is too small: it needs > {n_fixed + 100}")
    # Learn merges on pieces that never cross a word, a digit or a punctuation mark: digits stay single tokens
    # and no merge can join across a boundary when GemmaTokenizer later applies the merges to a whole string.
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    alphabet = [chr(c) for c in range(32, 127) if chr(c) != " "] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[])
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):  # byte-fallback pieces, named as in SentencePiece / Gemma
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in learned:
        vocab.setdefault(tok, len(vocab))

    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        chat_template=GEMMA3_CHAT_TEMPLATE,
        add_bos_token=True,
        add_eos_token=False,
    )
    tok.add_special_tokens({"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                           replace_extra_special_tokens=False)
    return tok


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    image_size: int = 128,
    patch_size: int = 8,
    mm_tokens_per_image: int = 16,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_intermediate: int = 128,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    vocab_size: int = 640,
    embed_std: float = 0.25,
    projector_std: float | None = None,
) -> Path:
    """Build a tiny random ``Gemma3ForConditionalGeneration`` + ``Gemma3Processor`` and save both to ``out_dir``.

    ``AutoModelForImageTextToText.from_pretrained(out_dir)`` and ``AutoProcessor.from_pretrained(out_dir)`` load
    them. Offline, deterministic for a given ``seed``, a fraction of a second with the defaults (~0.22 M
    parameters: vision and text 64 wide, 2 layers each, 128-px input, 16x16 patches of 8 px average-pooled to
    ``mm_tokens_per_image`` = 16 image tokens). 8-px patches, not 16: on simulated crops of an anatomy left out
    of training (the demo's training data with one base slice held out for validation), the model trained by
    ``recipes/tiny/sft/config_cpu.yaml`` ranks quality with SRCC 0.95 with 8-px patches and 0.78 with 16-px ones:
    it has to see pixel-scale noise, not only anatomy.

    Args:
        out_dir: folder to write: new, empty, or an earlier tiny model (its :data:`MARKER_FILE`), whose files are
            replaced. Any other non-empty folder (a trained model, someone's files) is refused before any work.
        seed: torch seed for the random weights.
        image_size: input side in pixels (the processor resizes every image to image_size x image_size).
        patch_size: SigLIP patch side in pixels; ``image_size`` must be a multiple of it.
        mm_tokens_per_image: image soft tokens per image; a perfect square whose side divides
            ``image_size // patch_size`` (Gemma 3 average-pools the patch grid down to it; MedGemma: 256).
        vision_*, text_*: widths, depths and heads of the SigLIP tower and the Gemma 3 decoder.
        vocab_size: tokenizer size (see :func:`build_tokenizer`).
        embed_std: std of the (tied) token embedding at init.
        projector_std: std of the multimodal projector (vision_hidden x text_hidden) at init; default
            ``embed_std`` so that image and text tokens enter the decoder at the same scale.
    Returns:
        ``Path(out_dir)``.
    Raises:
        CTIQAError: a size below 1 or an image below :data:`MIN_IMAGE_SIZE` px; inconsistent sizes (non-square
            token count, pooling that does not divide the patch grid, width not divisible by heads); ``out_dir`` is a file or a non-empty folder that is not a tiny model written here.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    sizes = {"image_size": image_size, "patch_size": patch_size, "mm_tokens_per_image": mm_tokens_per_image,
             "vision_hidden": vision_hidden, "text_hidden": text_hidden, "vision_layers": vision_layers,
             "text_layers": text_layers, "vision_heads": vision_heads, "text_heads": text_heads,
             "text_kv_heads": text_kv_heads, "vision_intermediate": vision_intermediate,
             "text_intermediate": text_intermediate}
    small = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if small or image_size < MIN_IMAGE_SIZE:
        raise CTIQAError(f"sizes must be at least 1 and the image at least {MIN_IMAGE_SIZE} px (got "
                         f"{', '.join(small) or f'image_size={image_size}'})")
    side = math.isqrt(mm_tokens_per_image)
    grid = image_size // patch_size
    if side * side != mm_tokens_per_image:
        raise CTIQAError(f"mm_tokens_per_image={mm_tokens_per_image} is not a perfect square")
    if image_size % patch_size or grid % side:
        raise CTIQAError(
            f"image_size={image_size}, patch_size={patch_size}: the {grid}x{grid} patch grid cannot be average-pooled "
            f"to {side}x{side} image tokens")
    for name, width, heads in (("vision", vision_hidden, vision_heads), ("text", text_hidden, text_heads)):
        if width % heads:
            raise CTIQAError(f"{name} width {width} is not divisible by {heads} heads")

    out = check_output_path(out_dir, folder=True, ours=MARKER_FILE,
                            hint="Give a new or empty folder (a trained model is never written over)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text("written by ctiqa tiny-model: random weights, not a trained model\n")
    tokenizer = build_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        head_dim=text_hidden // text_heads,
        query_pre_attn_scalar=text_hidden // text_heads,
        max_position_embeddings=4096,
        sliding_window=512,
        # Gemma 3 alternates 5 sliding-window layers with 1 global layer; keep both kinds in a 2-layer model.
        layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(text_layers)],
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    config.pad_token_id = ids["<pad>"]
    config.bos_token_id = ids["<bos>"]

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embed_std)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, embed_std if projector_std is None else projector_std)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        pad_token_id=ids["<pad>"],
        do_sample=False,
    )
    model.save_pretrained(out)

    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],  # as in Gemma 3's preprocessor_config.json
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )
    processor.save_pretrained(out)
    return out


def count_parameters(model: Any) -> dict[str, int]:
    """Parameter counts of a Gemma 3 VLM by part: ``vision``, ``projector``, ``text`` (incl. embeddings), ``total``."""
    parts = {"vision": 0, "projector": 0, "text": 0}
    for name, p in model.named_parameters():
        key = "vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name else "text"
        parts[key] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------------------- CLI
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ctiqa tiny-model``."""
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model and processor to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--image-size", type=int, default=128, help="input side in pixels (default 128)")
    parser.add_argument("--patch-size", type=int, default=8, help="vision patch side in pixels (default 8)")
    parser.add_argument("--width", type=int, default=64, help="vision and text hidden width (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="vision and text depth (default 2)")


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa tiny-model --out DIR [--seed S]``: build, save and describe the tiny model."""
    import time

    from transformers import AutoModelForImageTextToText

    t0 = time.perf_counter()
    out = build_tiny_model(args.out, seed=args.seed, image_size=args.image_size, patch_size=args.patch_size,
                           vision_hidden=args.width, text_hidden=args.width,
                           vision_intermediate=2 * args.width, text_intermediate=2 * args.width,
                           vision_layers=args.layers, text_layers=args.layers)
    dt = time.perf_counter() - t0
    counts = count_parameters(AutoModelForImageTextToText.from_pretrained(out))
    print(f"tiny Gemma 3 VLM written to {out} in {dt:.2f} s: "
          + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in counts.items()))
    return 0
