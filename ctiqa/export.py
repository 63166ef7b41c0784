"""``ctiqa export``: merge a LoRA adapter into a full copy of its base and save a servable model.

Why: inference servers load a full model folder fastest and most faithfully. vLLM loads only the language-model
part of a Gemma 3 LoRA adapter and drops vision-tower LoRA weights (vllm-project/vllm#32758), while the paper's
recipe trains LoRA on the vision tower too (``lora_target_modules: all-linear``); serving the adapter through
vLLM would silently score with a different model. The merged folder holds everything in one place::

    ctiqa export --adapter runs/medgemma-qlora --out runs/medgemma-merged
    vllm serve runs/medgemma-merged ...            # or: transformers serve runs/medgemma-merged

What is written in ``--out``: the merged weights (``model.safetensors``, bf16 by default), ``config.json``,
``generation_config.json``, the processor (tokenizer, image processor, chat template; from the adapter folder
when ``recipes/sft.py`` saved one there, else from the base), the merged model's settings
(:data:`ctiqa.model_settings.SETTINGS_FILE`: a full model in ``--dtype``, :func:`ctiqa.model_settings.exported_settings`,
so ``ctiqa predict/evaluate --precision auto`` load it in that dtype and do not quantise it again; encoding, answer
format and prompt version as the adapter learned them; an ``export`` entry says what was merged into what and holds
the adapter's training settings under ``training``), and ``EXPORTED`` (the export settings, written last: a folder
without it is an interrupted export).

How the base is loaded before merging (``--base-weights``): ``original`` (the base checkpoint's weights) or
``nf4`` (quantised to NF4 with double quantisation as ``recipes/sft.py`` does, then dequantised: exactly the
weights a QLoRA adapter learned against, so the merged model computes what the adapter computed in training).
``auto`` (default) picks ``nf4`` when the adapter's settings say it was trained on a 4-bit base. The merge is
done in fp32 (``peft`` ``merge_and_unload``: W + scale * B @ A) and the result cast to ``--dtype``. Merging into a
4-bit model is not possible (the merged delta would be re-quantised), so the base is always loaded unquantised.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.model_settings import (
    EXPORT_KEY,
    PRECISION_DTYPES,
    SETTINGS_FILE,
    bnb_4bit_settings,
    exported_settings,
    inference_precision,
)
from ctiqa.paths import check_source_folder, is_local_path

#: Written last into an export folder; holds the export settings.
DONE_FILE = "EXPORTED"
#: Written first into ``OUT.partial`` while an export runs: only a folder holding it is ever removed by a re-run.
PARTIAL_MARKER = ".ctiqa-export-partial"
DTYPES = ("bf16", "fp32")
BASE_WEIGHTS = ("auto", "original", "nf4")


def read_training_settings(adapter: str) -> dict[str, Any] | None:
    """The adapter's :data:`SETTINGS_FILE` (local folder or Hub repo), or None when it has none.

    Raises:
        CTIQAError: the file exists but is not a JSON object.
    """
    if is_local_path(adapter):
        path = Path(adapter).expanduser() / SETTINGS_FILE
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(adapter, SETTINGS_FILE))
        except EntryNotFoundError:
            return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CTIQAError(f"{path}: not JSON ({e.msg})") from e
    if not isinstance(data, dict):
        raise CTIQAError(f"{path}: expected a JSON object")
    return data


def adapter_sha256(adapter: str) -> str:
    """SHA-256 (hex) of the adapter's weights file (``adapter_model.safetensors``, else ``adapter_model.bin``; a
    local folder or a Hub repo, downloaded to the Hub cache): the identity of the weights an export merged, so that
    a retrained adapter saved at the same path is not taken for the one exported before.

    Raises:
        CTIQAError: the adapter has neither weights file.
    """
    import hashlib

    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if is_local_path(adapter):
            path = Path(adapter).expanduser() / name
            if not path.is_file():
                continue
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(hf_hub_download(adapter, name))
            except EntryNotFoundError:
                continue
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    raise CTIQAError(f"adapter {adapter}: has no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}")


def _resolve(adapter: str, base: str | None) -> tuple[str, str]:
    """(adapter, base model) after checking the adapter folder; the base defaults to the adapter's own."""
    from peft import PeftConfig

    if is_local_path(adapter):
        p = Path(adapter).expanduser()
        if not p.is_dir():
            raise CTIQAError(f"adapter {adapter}: no such folder (and not a Hub id of the form owner/name)")
        if not (p / "adapter_config.json").is_file():
            hint = " (it is a full model: serve it as it is)" if (p / "config.json").is_file() else ""
            raise CTIQAError(f"adapter {adapter}: folder has no adapter_config.json{hint}")
    try:
        cfg = PeftConfig.from_pretrained(adapter)
    except (OSError, ValueError) as e:
        raise CTIQAError(f"cannot read the adapter config of {adapter}: {e}") from e
    if getattr(cfg, "peft_type", None) is not None and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
        raise CTIQAError(f"adapter {adapter}: a {cfg.peft_type} adapter; only LoRA adapters can be merged")
    recorded = base is None
    base = base or cfg.base_model_name_or_path
    if not base:
        raise CTIQAError(f"adapter {adapter}: adapter_config.json has no base_model_name_or_path; pass --model")
    # a relative base path is resolved from the current folder, not the adapter's: say so before loading anything
    check_source_folder(base, "base model" + (" (recorded in the adapter's adapter_config.json; --model gives "
                                              "another)" if recorded else ""), "config.json")
    return adapter, base


def export_model(adapter: str, out: str | Path, *, model: str | None = None, dtype: str = "bf16",
                 base_weights: str = "auto", push_to_hub: str | None = None, private: bool = True) -> Path:
    """Merge a LoRA adapter into its base model and save a full model folder (see the module docstring).

    Args:
        adapter: PEFT LoRA adapter folder or Hub id (as saved or pushed by ``recipes/sft.py``).
        out: output folder; must not exist or be empty (an earlier interrupted export of this function, one
            without :data:`DONE_FILE`, is replaced; a finished one of the same adapter weights (:func:`adapter_sha256`),
            base, base weights and dtype is left as it is and returned; one that differs is refused).
        model: base model id or folder (default: the adapter's ``base_model_name_or_path``).
        dtype: "bf16" (default; what vLLM and ``transformers serve --dtype auto`` load) or "fp32".
        base_weights: "auto", "original" or "nf4" (see the module docstring).
        push_to_hub: a Hub repo id to upload the folder to (private unless ``private=False``; token from
            ``HF_TOKEN`` or ``hf auth login``, never printed).
    Returns:
        the output folder.
    Raises:
        CTIQAError: a missing or non-LoRA adapter, an unloadable base, an unknown dtype or base_weights, or an
            output folder that holds other files.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    from ctiqa.inference import trained_settings_of

    if dtype not in DTYPES:
        raise CTIQAError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if base_weights not in BASE_WEIGHTS:
        raise CTIQAError(f"unknown base weights {base_weights!r}; choose one of {', '.join(BASE_WEIGHTS)}")
    out = Path(out)
    adapter, base = _resolve(str(adapter), model)
    training = read_training_settings(adapter)
    trained = trained_settings_of(adapter)
    if base_weights == "auto":
        base_weights = "nf4" if trained and trained.load_in_4bit else "original"
    # what makes two exports the same: a finished export is reused only when every one of these matches
    settings_out = {"adapter": str(adapter), "dtype": dtype, "base_model": str(base), "base_weights": base_weights,
                    "adapter_sha256": adapter_sha256(adapter)}
    if (out / DONE_FILE).is_file():
        done = json.loads((out / DONE_FILE).read_text())
        def same(k: str) -> bool:  # a local adapter or base spelt otherwise (relative, ./, a link) is the same
            a, b = done.get(k), settings_out[k]
            if k in ("adapter", "base_model") and isinstance(a, str) and is_local_path(a) and is_local_path(b):
                return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
            return a == b

        diff = [k for k in settings_out if not same(k)]
        if diff:
            raise CTIQAError(f"{out} holds another export (" + ", ".join(
                f"{k}: {done.get(k)!r} then, {settings_out[k]!r} now" for k in diff) + "); choose another --out "
                "(nothing was changed)")
        print(f"{out}: already exported (remove the folder to export again)", file=sys.stderr)
    else:
        if out.is_symlink():  # the merge is written beside the folder and renamed onto it: follow the link first
            out = Path(os.path.realpath(out))
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CTIQAError(f"{out}: exists and is not empty; choose a new --out (nothing was written)")
        tmp = out.with_name(out.name + ".partial")
        if tmp.exists() or tmp.is_symlink():
            if not (tmp / PARTIAL_MARKER).is_file() or tmp.is_symlink():
                raise CTIQAError(f"{tmp}: exists and was not left by an interrupted ctiqa export (no {PARTIAL_MARKER})"
                                 "; move it or choose another --out (nothing was written)")
            shutil.rmtree(tmp)  # our own interrupted export: nothing of the user's
        tmp.mkdir(parents=True)
        (tmp / PARTIAL_MARKER).write_text("an interrupted ctiqa export: removed by the next one into the same --out\n")
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if base_weights == "nf4":
            # quantise from the dtype the base had when the adapter learned (recorded by recipes/sft.py)
            recorded = getattr(torch, str(trained and trained.dtype), None)
            kwargs["dtype"] = recorded if isinstance(recorded, torch.dtype) else torch.bfloat16
            # the same 4-bit base as in training: recorded quant type, double quantisation, compute and storage
            # dtypes (one home: ctiqa.model_settings), as `ctiqa evaluate --precision auto` loads it
            bnb = bnb_4bit_settings(trained, inference_precision("4bit", trained, "cpu")[1])
            for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
                bnb[k] = getattr(torch, bnb[k])
            kwargs["quantization_config"] = BitsAndBytesConfig(**bnb)
            kwargs["device_map"] = {"": "cuda:0" if torch.cuda.is_available() else "cpu"}
        try:
            net = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
        except (OSError, ValueError) as e:
            raise CTIQAError(f"cannot load base model {base}: {e}") from e
        if base_weights == "nf4":
            net = net.dequantize(dtype=torch.float32).to("cpu", dtype=torch.float32)
        try:
            peft_model = PeftModel.from_pretrained(net, adapter)
        except (OSError, ValueError, RuntimeError) as e:
            raise CTIQAError(f"cannot load adapter {adapter} onto {base}: {e}") from e
        merged = peft_model.merge_and_unload()
        merged = merged.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        for cfg in (merged.config, *(getattr(merged.config, k, None) for k in merged.config.sub_configs)):
            if cfg is not None:
                cfg.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        merged.save_pretrained(tmp)
        # the processor recipes/sft.py saved (and pushed) beside the adapter, else the base's
        processor, source = None, base
        if not is_local_path(adapter) or any((Path(adapter) / f).exists()
                                         for f in ("processor_config.json", "preprocessor_config.json")):
            try:
                processor, source = AutoProcessor.from_pretrained(adapter), adapter
            except (OSError, ValueError):
                processor = None
        try:
            (processor or AutoProcessor.from_pretrained(base)).save_pretrained(tmp)
        except (OSError, ValueError) as e:
            raise CTIQAError(f"cannot load the processor of {base}: {e}") from e
        export = {**settings_out, "merge": "peft merge_and_unload",
                  "processor_from": str(source)}
        # the merged model's own settings (a full model in `dtype`), the adapter's kept for the record
        merged_settings = exported_settings(trained, PRECISION_DTYPES[dtype]).to_dict()
        (tmp / SETTINGS_FILE).write_text(json.dumps({**merged_settings, EXPORT_KEY: {**export, "training": training}},
                                                    indent=2) + "\n")
        (tmp / DONE_FILE).write_text(json.dumps(export, indent=2) + "\n")
        (tmp / PARTIAL_MARKER).unlink()
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.replace(out)
        print(f"wrote {out} (merged {adapter} into {base}, {base_weights} base weights, {dtype})")
    if push_to_hub:
        from huggingface_hub import HfApi

        from ctiqa.cards import hub_push

        api = HfApi()
        with hub_push(push_to_hub):
            url = api.create_repo(push_to_hub, private=private, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=str(out), commit_message="ctiqa export: merged model")
        print(f"pushed {out} to {url}")
    return out


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ctiqa export``."""
    parser.description = ("Merge a LoRA adapter into a full copy of its base and save a servable model (for vLLM, "
                          "which drops Gemma 3 vision-tower LoRA weights, and `transformers serve`).")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder or Hub id")
    parser.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    parser.add_argument("--model", help="base model id or folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="dtype of the saved weights (default bf16)")
    parser.add_argument("--base-weights", default="auto", choices=BASE_WEIGHTS,
                        help="merge into the original base weights or NF4-dequantised ones (auto: nf4 when the "
                             "adapter was trained on a 4-bit base)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the merged folder to this Hub repo")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")


def cli_main(args: argparse.Namespace) -> int:
    """Run ``ctiqa export``. Returns 0."""
    export_model(args.adapter, args.out, model=args.model, dtype=args.dtype, base_weights=args.base_weights,
                 push_to_hub=args.push_to_hub, private=not args.public)
    return 0
