"""QLoRA step time and peak GPU memory of MedGemma-4B's architecture, with random weights (no download, no login).

    python bench/bench_medgemma_gpu.py [--batch 4] [--text-tokens 600] [--steps 5] [--no-checkpointing]

Builds ``Gemma3ForConditionalGeneration`` from the configuration written below (the published config.json of
``google/medgemma-4b-it``, which is Gemma 3 4B's: SigLIP 896 px / patch 14 / 27 layers / 1152 wide, 256 image tokens,
decoder 34 layers / 2560 wide / 8 heads, 4 KV heads, head dim 256, vocabulary 262,208), random bf16 weights saved to
a temporary folder, loads it back in 4-bit NF4 (double quantisation, bf16 compute and storage: the paper recipe),
adds LoRA r 16 / alpha 16 / dropout 0.05 on all linear layers, and times ``--steps`` optimiser steps (after one
warm-up) on random images with the recipe's sequence shape (BOS, user turn, 256 image tokens, ~``--text-tokens``
text tokens of which the last part is supervised). Prints s/step, examples/s, tokens/s and
``torch.cuda.max_memory_allocated``. Needs a CUDA GPU with bf16 and ~10 GB free disk; without CUDA it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

#: google/medgemma-4b-it config.json (= google/gemma-3-4b-it's architecture).
MEDGEMMA_4B = {
    "text": dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0},
                 max_position_embeddings=131_072, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                 pad_token_id=0, eos_token_id=1, bos_token_id=2),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=896, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6,
                   hidden_act="gelu_pytorch_tanh"),
    "mm_tokens_per_image": 256,
    "boi_token_index": 255_999,
    "eoi_token_index": 256_000,
    "image_token_index": 262_144,
}


def build_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = dict(MEDGEMMA_4B["text"])
    rope = text.pop("rope_scaling")
    text_config = Gemma3TextConfig(**text, rope_parameters={
        "full_attention": {"rope_type": rope["rope_type"], "factor": rope["factor"], "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    return Gemma3Config(text_config=text_config, vision_config=SiglipVisionConfig(**MEDGEMMA_4B["vision"]),
                        mm_tokens_per_image=MEDGEMMA_4B["mm_tokens_per_image"],
                        boi_token_index=MEDGEMMA_4B["boi_token_index"],
                        eoi_token_index=MEDGEMMA_4B["eoi_token_index"],
                        image_token_index=MEDGEMMA_4B["image_token_index"])


def make_batch(batch: int, text_tokens: int, device):
    """Random inputs shaped like a training batch: ids, attention mask, token_type_ids, pixels, labels."""
    import torch

    n_img = MEDGEMMA_4B["mm_tokens_per_image"]
    prompt = torch.randint(10, 200_000, (batch, 80))
    target = torch.randint(10, 200_000, (batch, max(text_tokens - 80, 16)))
    img = torch.full((batch, n_img), MEDGEMMA_4B["image_token_index"])
    ids = torch.cat([torch.full((batch, 1), 2), torch.full((batch, 1), MEDGEMMA_4B["boi_token_index"]), img,
                     torch.full((batch, 1), MEDGEMMA_4B["eoi_token_index"]), prompt, target], dim=1)
    labels = ids.clone()
    labels[:, : ids.shape[1] - target.shape[1]] = -100
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": (ids == MEDGEMMA_4B["image_token_index"]).long().to(device),
        "pixel_values": torch.randn(batch, 3, 896, 896, dtype=torch.bfloat16, device=device),
        "labels": labels.to(device),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="per-device batch (paper: 4)")
    ap.add_argument("--text-tokens", type=int, default=600, help="text tokens per example (prompt + target)")
    ap.add_argument("--steps", type=int, default=5, help="timed optimiser steps (after 1 warm-up)")
    ap.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_medgemma_gpu: no CUDA GPU visible (torch.cuda.is_available() is False); this benchmark needs "
              "one (bf16, ~10 GB GPU memory, ~10 GB disk). Nothing was run.")
        return 0
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma3ForConditionalGeneration

    dev = torch.device("cuda", 0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medgemma-random-") as tmp:
        with torch.device(dev):
            model = Gemma3ForConditionalGeneration._from_config(build_config(), dtype=torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()
        built = time.perf_counter() - t0
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        model = Gemma3ForConditionalGeneration.from_pretrained(tmp, quantization_config=bnb, dtype=torch.bfloat16,
                                                               device_map={"": 0}, attn_implementation="eager")
        loaded = time.perf_counter() - t1
    load_mem = torch.cuda.max_memory_allocated() / 2**30
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batch = make_batch(args.batch, args.text_tokens, dev)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
    s_step = sum(times) / len(times)
    tokens = batch["input_ids"].numel()
    print(f"GPU: {torch.cuda.get_device_name(0)}; MedGemma-4B architecture, {n_params / 1e9:.2f} B parameters, "
          f"random weights (built + saved {built:.0f} s, 4-bit load {loaded:.0f} s, {load_mem:.2f} GiB after load)")
    print(f"QLoRA r16 all-linear: {trainable / 1e6:.1f} M trainable; batch {args.batch} x "
          f"{batch['input_ids'].shape[1]} tokens (256 image), gradient checkpointing {not args.no_checkpointing}")
    print(f"step {s_step:.3f} s | {args.batch / s_step:.2f} examples/s | {tokens / s_step:.0f} tokens/s | "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | last loss {loss.item():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
