"""What a trained model needs to be used as it was trained: one home for precision choices and the settings file.

``recipes/sft.py`` (and any recipe built on :mod:`ctiqa.training`) writes :data:`SETTINGS_FILE` beside the adapter
or model; ``ctiqa evaluate`` / ``ctiqa predict`` (through :func:`ctiqa.inference.load_model`) read it, so that

- an adapter trained on a 4-bit base is evaluated on the same 4-bit base, with the same compute and storage
  dtypes (a QLoRA adapter trained with fp32 compute is run with fp32 compute, not bf16);
- a model is fed pixels in the render encoding it was trained on (``medgemma-3window``, ``soft-tissue``,
  :data:`ctiqa.imaging.ENCODINGS`) without being told, and a different encoding the user forces is warned about;
- the answer format and prompt version it learned are known.

This module is light (standard library only; :func:`dataset_fingerprint`, used by training, imports ``datasets``
when called) so the inference side never imports TRL or torch to read it.

File format (JSON, ``settings_version`` 2)::

    {"settings_version": 2, "base_model": "google/medgemma-4b-it", "adapter": true,
     "load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
     "compute_dtype": "bfloat16", "storage_dtype": "bfloat16", "dtype": "bfloat16", "bf16": true,
     "encoding": "soft-tissue", "target_format": "score-first", "prompt_version": "ctiqa-prompt-v1",
     "ctiqa_version": "0.1.0"}

Version 1 (before this module) held ``base_model``, ``adapter``, ``load_in_4bit``, ``bnb_4bit_quant_type``,
``dtype`` and ``bf16`` only; it is still read (missing fields are None: unknown).

A ``ctiqa export`` folder (an adapter merged into its base) holds the same file describing the merged model
(:func:`exported_settings`: a full, unquantised model in the export's dtype) plus an :data:`EXPORT_KEY` entry saying
what was merged into what, with the adapter's own training settings under ``"training"``. Files written before
exports were described so (the adapter's settings copied, ``adapter: true``, plus the ``export`` entry) are read
as the merged model too.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError

logger = logging.getLogger(__name__)

#: File written beside the adapter / model by the training recipes.
SETTINGS_FILE = "ctiqa_training.json"
#: Written last beside the model by the training recipes, when model, settings and card are saved.
DONE_FILE = "DONE"
#: The run's own record of what defines it (dataset and its content, train split, model, hyperparameters), written
#: in ``output_dir`` when a training run starts (:func:`ctiqa.training.run_config`); read by ``ctiqa evaluate`` to
#: tell an evaluation on the data the model was trained on (:func:`ctiqa.evaluation.trained_on_split`).
RUN_CONFIG_FILE = "ctiqa_run.json"
SETTINGS_VERSION = 2
#: Entry of :data:`SETTINGS_FILE` in a ``ctiqa export`` folder: the export settings (``dtype`` of the saved weights,
#: "bf16" / "fp32"; adapter, base, base weights) and the adapter's training settings under ``"training"``.
EXPORT_KEY = "export"

#: Inference precisions (``--precision`` of ``ctiqa evaluate`` / ``ctiqa predict``): "auto" = what training used
#: (this module's settings file), else bf16 on a GPU and fp32 on the CPU; "4bit" = bitsandbytes NF4.
PRECISIONS = ("auto", "fp32", "bf16", "4bit")
#: torch dtype name of each non-quantised precision.
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
#: Dtypes Gemma 3 trains in: bf16 or fp32. fp16 overflows Gemma 3's activations (NaN loss, empty generations;
#: google/gemma-3 model cards recommend bf16), so it is refused.
TRAINING_DTYPES = ("bfloat16", "float32")
#: The paper's 4-bit setting (design notes §3), used when ``--precision 4bit`` is forced without a settings file.
DEFAULT_4BIT = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "compute_dtype": "bfloat16",
                "storage_dtype": "bfloat16"}


@dataclass
class TrainedSettings:
    """How a model or adapter was trained (the content of :data:`SETTINGS_FILE`). None = not recorded.

    Attributes:
        base_model: model id or folder the run started from.
        adapter: True for a (Q)LoRA adapter, False for a full model.
        load_in_4bit: the base was loaded in 4 bit (bitsandbytes) while the adapter learned.
        bnb_4bit_quant_type: "nf4" or "fp4"; bnb_4bit_use_double_quant: nested quantisation.
        compute_dtype: torch dtype name of the matmuls ("bfloat16", "float32"); for a 4-bit base the
            bitsandbytes compute dtype, else the dtype the weights were loaded in.
        storage_dtype: torch dtype name the 4-bit weights are packed in (``bnb_4bit_quant_storage``).
        dtype: dtype name the (non-quantised) weights were loaded in; bf16: mixed precision flag of the trainer.
        encoding: render encoding of the training images (:data:`ctiqa.imaging.ENCODINGS`).
        target_format: answer format learned (:data:`ctiqa.prompts.TARGET_FORMATS`).
        prompt_version: :data:`ctiqa.prompts.PROMPT_VERSION` of the training prompts.
        ctiqa_version: version of ctiqa that trained it.
        settings_version: 2 for this layout, 1 for files written before it.
    """

    base_model: str | None = None
    adapter: bool | None = None
    load_in_4bit: bool | None = None
    bnb_4bit_quant_type: str | None = None
    bnb_4bit_use_double_quant: bool | None = None
    compute_dtype: str | None = None
    storage_dtype: str | None = None
    dtype: str | None = None
    bf16: bool | None = None
    encoding: str | None = None
    target_format: str | None = None
    prompt_version: str | None = None
    ctiqa_version: str | None = None
    settings_version: int = SETTINGS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_settings(folder: str | Path, settings: TrainedSettings) -> Path:
    """Write ``settings`` to ``folder/ctiqa_training.json`` (indented JSON). Returns the file's path."""
    path = Path(folder) / SETTINGS_FILE
    path.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    return path


#: The 4-bit storage dtype transformers' ``BitsAndBytesConfig`` uses when ``bnb_4bit_quant_storage`` is unset
#: (transformers/utils/quantization_config.py: ``torch.uint8``).
BNB_DEFAULT_STORAGE = "uint8"


def read_settings(folder: str | Path | None) -> TrainedSettings | None:
    """The settings recorded beside a model or adapter, or None when ``folder`` is None, not a local folder
    (a Hub id: use a downloaded snapshot) or holds no :data:`SETTINGS_FILE`.

    Reads version 2 and the version-1 form (``dtype`` then gives the compute dtype of a 4-bit base, as TRL's
    ``get_quantization_config`` used it). Unknown keys are ignored.

    Raises:
        CTIQAError: the file exists but is not a JSON object.
    """
    if folder is None:
        return None
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CTIQAError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CTIQAError(f"{path}: expected a JSON object")
    known = {f.name for f in fields(TrainedSettings)}
    s = TrainedSettings(**{k: v for k, v in raw.items() if k in known})
    if s.storage_dtype == "None":  # recorded so by ctiqa before a fix when the recipe left the storage unset
        s.storage_dtype = BNB_DEFAULT_STORAGE
    if "settings_version" not in raw:  # version 1
        s.settings_version = 1
        s.dtype = s.compute_dtype = _dtype_name(raw.get("dtype"))  # quant storage, double quant: not recorded
    export = raw.get(EXPORT_KEY)
    if isinstance(export, dict) and _dtype_name(export.get("dtype")) in TRAINING_DTYPES:
        # a merged model; older exports kept the adapter's settings at the top level (adapter, 4-bit base)
        s = exported_settings(s, _dtype_name(export["dtype"]))
    return s


#: Files whose (name, size, mtime) stand for a model's or adapter's weights in :func:`weights_fingerprint`.
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
#: Small files of a model or adapter folder whose content :func:`weights_fingerprint` hashes.
WEIGHT_CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json", SETTINGS_FILE,
                       "model.safetensors.index.json")


def weights_fingerprint(*folders: str | Path | None) -> str | None:
    """A cheap fingerprint (SHA-256 hex, 64 chars) of the weights in local model / adapter folders: changed by any
    re-save or copy of the weights into them, so that rows scored by one model are never resumed as another's.

    An adapter folder brings its base model's folder along (``base_model_name_or_path`` of its
    ``adapter_config.json``, when that is a local folder not given already): ``--adapter A`` alone scores with that
    base, so a base re-saved in place is another model too.

    Hashes, per folder in order, the (name, size in bytes, mtime in ns) of its top-level weight files
    (:data:`WEIGHT_FILE_PATTERNS`: ``model*.safetensors``, ``adapter_model.*``, ...) and the content of its small
    config files (:data:`WEIGHT_CONFIG_FILES`); no weight file is read, so an 8 GB model costs a few ``stat`` calls.
    Checkpoint sub-folders are not looked at. The same weights copied anew (a new mtime) count as changed: a
    resume is refused rather than mixing models. For the content digest of an adapter that ``ctiqa export``
    records, see :func:`ctiqa.export.adapter_sha256`.

    Args:
        folders: model and adapter names as given (``--model``, ``--adapter``); None, Hub ids and anything that is
            not an existing local folder are left out (a Hub id's weights are not fingerprinted or compared: pin a
            revision for that).
    Returns:
        the hex digest, or None when no argument is a local folder (nothing to compare).
    """
    import hashlib

    local = [Path(f).expanduser() for f in folders if f is not None and Path(f).expanduser().is_dir()]
    if not local:
        return None
    for folder in list(local):  # an adapter's base folder (its adapter_config.json) is part of the model it scores
        try:
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if base and Path(base).expanduser().is_dir() and not any(
                os.path.samefile(Path(base).expanduser(), f) for f in local):
            local.append(Path(base).expanduser())
    h = hashlib.sha256()
    for folder in local:
        h.update(b"folder\0")
        weights = sorted({p for pattern in WEIGHT_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()})
        for p in weights:
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        for name in WEIGHT_CONFIG_FILES:
            p = folder / name
            if p.is_file():
                h.update(f"{name}\0".encode() + p.read_bytes() + b"\0")
    return h.hexdigest()


#: Prefix of the content fingerprint :func:`dataset_fingerprint` returns; a recorded value without it is the older
#: file-date form (:func:`legacy_dataset_fingerprint`).
DATASET_FINGERPRINT_PREFIX = "sha256:"


def dataset_data_files(name: str | Path, config: str | None = None) -> dict[str, list[Path]] | None:
    """The data files ``datasets.load_dataset(name, config)`` reads from a local dataset folder, per split, as the
    ``datasets`` library resolves them (``load_dataset_builder(...).config.data_files``: the ``configs`` of its
    README.md, else the Hub layout conventions such as ``data/{split}-*.parquet``); nothing is loaded. The card,
    ``audit.csv`` and anything else in the folder that is not read as data are not listed.

    Returns:
        ``{split: [absolute paths]}``, or None when ``name`` is not a local folder or ``datasets`` finds no data
        files there (the load reports that, with its own message).
    """
    if name is None or not Path(name).expanduser().is_dir():
        return None
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(str(Path(name).expanduser()), name=config)
    except (OSError, ValueError) as e:  # no data files, bad README configs: left to load_dataset to report
        logger.debug("dataset %s: no data files resolved (%s)", name, e)
        return None
    return {split: [Path(f) for f in files] for split, files in (builder.config.data_files or {}).items()}


def dataset_fingerprint(name: str | Path | None, config: str | None = None) -> str | None:
    """A content fingerprint of a local dataset folder, so that a training run resumed onto a dataset rebuilt at the
    same path with other rows is recognised as another run, while a byte-identical rebuild (``ctiqa build-dataset``
    run again) or files added beside the data (a run's outputs, notes) leave it unchanged.

    Hashes, per split in name order, each of its data files (:func:`dataset_data_files`: only what
    ``load_dataset`` reads, not the card or ``audit.csv``): its path relative to the folder and the SHA-256 of its
    bytes. Every data file is read once per training start: 0.2 s for 300 MB in the page cache on this project's
    2-core CI machine (``bench/bench_fingerprint.py``; from a cold disk, the disk's read speed), small next to
    loading the model, so nothing is cached.

    Args:
        name: the dataset as given (``dataset_name``); config: its ``dataset_config`` (None: the default).
    Returns:
        ``"sha256:"`` + 64 hex digits; None for Hub ids, anything not a local folder, or a folder without data files.
    """
    import hashlib

    files = dataset_data_files(name, config) if name is not None else None
    if not files:
        return None
    root = Path(name).expanduser().resolve()
    h = hashlib.sha256()
    for split in sorted(files):
        for p in files[split]:
            rel = p.resolve().relative_to(root).as_posix() if p.resolve().is_relative_to(root) else str(p)
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            h.update(f"{split}\0{rel}\0{digest}\0".encode())
    return DATASET_FINGERPRINT_PREFIX + h.hexdigest()


#: Files that :func:`legacy_dataset_fingerprint` stats, at any depth.
LEGACY_DATASET_FILE_PATTERNS = ("*.parquet", "*.arrow", "*.jsonl", "*.json", "*.csv")


def legacy_dataset_fingerprint(name: str | Path | None) -> str | None:
    """The dataset fingerprint recorded by ctiqa before :func:`dataset_fingerprint` hashed content (SHA-256 hex,
    no prefix): every ``*.parquet/arrow/jsonl/json/csv`` file of the folder at any depth, by relative name, size and
    mtime in ns. Kept only to judge the records of those older runs (``ctiqa.training.prepare_output_dir``): a
    re-run on untouched files still matches it. None for Hub ids and anything not a local folder."""
    import hashlib

    if name is None or not Path(name).expanduser().is_dir():
        return None
    root = Path(name).expanduser()
    h = hashlib.sha256()
    files = sorted({p for pattern in LEGACY_DATASET_FILE_PATTERNS for p in root.rglob(pattern) if p.is_file()})
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def exported_settings(training: TrainedSettings | None, weights_dtype: str) -> TrainedSettings:
    """The settings of a model merged from an adapter by ``ctiqa export``: a full model (``adapter`` False), not
    quantised (``load_in_4bit`` False, no 4-bit fields), weights and compute in ``weights_dtype``, so that
    ``--precision auto`` (:func:`inference_precision`) loads it in the dtype it was saved in, not on a 4-bit base
    again. Base model, render encoding, answer format, prompt and ctiqa versions are kept from ``training``.

    Args:
        training: the adapter's settings (:func:`read_settings`) or None. weights_dtype: "float32" or "bfloat16".
    Raises:
        CTIQAError: ``weights_dtype`` not one of :data:`TRAINING_DTYPES`.
    """
    if weights_dtype not in TRAINING_DTYPES:
        raise CTIQAError(f"unknown weights dtype {weights_dtype!r}; choose one of {', '.join(TRAINING_DTYPES)}")
    return replace(training or TrainedSettings(), adapter=False, load_in_4bit=False, bnb_4bit_quant_type=None,
                   bnb_4bit_use_double_quant=None, storage_dtype=None, dtype=weights_dtype,
                   compute_dtype=weights_dtype, bf16=None, settings_version=SETTINGS_VERSION)


def _dtype_name(value: Any) -> str | None:
    """"torch.float32" / "float32" / "fp32" / "bf16" -> "float32" / "bfloat16"; None/"auto" -> None."""
    if value in (None, "None", "auto"):
        return None
    name = str(value).replace("torch.", "")
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}.get(
        name, name)


def inference_precision(requested: str, settings: TrainedSettings | None, device: str) -> tuple[str, str]:
    """The precision to load a model with, and the compute dtype name.

    Args:
        requested: one of :data:`PRECISIONS`. device: "cpu", "cuda", "cuda:1", ...
        settings: what training used (:func:`read_settings`), or None.
    Returns:
        (precision, compute dtype): "auto" becomes "4bit" for an adapter trained on a 4-bit base (compute dtype
        as trained), else the dtype the weights were trained in ("fp32" / "bf16"), else "bf16" on CUDA and
        "fp32" on the CPU. A forced precision keeps its own dtype; forced "4bit" computes in the recorded compute
        dtype when there is one, else bf16 (:data:`DEFAULT_4BIT`).
    Raises:
        CTIQAError: unknown precision.
    """
    if requested not in PRECISIONS:
        raise CTIQAError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    trained_4bit = bool(settings and settings.adapter and settings.load_in_4bit)
    recorded = settings.compute_dtype if settings and settings.compute_dtype in TRAINING_DTYPES else None
    if requested == "auto":
        if trained_4bit:
            return "4bit", recorded or DEFAULT_4BIT["compute_dtype"]
        if recorded:
            return {v: k for k, v in PRECISION_DTYPES.items()}[recorded], recorded
        requested = "bf16" if device.startswith("cuda") else "fp32"
    if requested == "4bit":
        return "4bit", (recorded if trained_4bit and recorded else DEFAULT_4BIT["compute_dtype"])
    if settings is not None and trained_4bit:
        logger.warning("the adapter was trained on a 4-bit base; loading the base in %s instead (forced)", requested)
    return requested, PRECISION_DTYPES[requested]


def bnb_4bit_settings(settings: TrainedSettings | None, compute_dtype: str) -> dict[str, Any]:
    """Keyword arguments for ``transformers.BitsAndBytesConfig`` (dtypes as names) reproducing the 4-bit base an
    adapter learned on: recorded quant type, double quantisation and storage dtype, else :data:`DEFAULT_4BIT`."""
    s = settings if settings is not None and settings.load_in_4bit else None
    storage = (s.storage_dtype if s and s.storage_dtype else None) or DEFAULT_4BIT["storage_dtype"]
    double = s.bnb_4bit_use_double_quant if s and s.bnb_4bit_use_double_quant is not None else \
        DEFAULT_4BIT["bnb_4bit_use_double_quant"]
    return {"load_in_4bit": True,
            "bnb_4bit_quant_type": (s.bnb_4bit_quant_type if s and s.bnb_4bit_quant_type else
                                    DEFAULT_4BIT["bnb_4bit_quant_type"]),
            "bnb_4bit_use_double_quant": bool(double),
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": storage}


def choose_encoding(requested: str | None, settings: TrainedSettings | None, *, default: str = "soft-tissue",
                    source: str = "but --encoding forces") -> str:
    """The render encoding to feed a model: the one it was trained on unless the user forces another.

    Args:
        requested: the user's ``--encoding`` (None: not given). settings: the model's recorded settings or None.
        default: used when neither says (models trained before encodings were recorded: ``soft-tissue``).
        source: how the warning names where ``requested`` comes from.
    Returns:
        an encoding name. Logs a warning when ``requested`` differs from the recorded one (the user forced it).
    """
    trained = settings.encoding if settings is not None else None
    if requested is None:
        return trained or default
    if trained and requested != trained:
        logger.warning("the model was trained on %s images, %s %s; expect wrong scores", trained, source,
                       requested)
    return requested


def dataset_encoding(dataset_name: str, revision: str | None = None) -> str | None:
    """The render encoding (:data:`ctiqa.imaging.ENCODINGS`) a ``ctiqa build-dataset`` dataset was made with, read
    from its card: the ``ctiqa.encoding`` metadata field when present, else the card's line "rendered with encoding
    `NAME`". None when the card is missing or says neither.
    """
    from huggingface_hub import DatasetCard

    try:
        path = Path(dataset_name) / "README.md"
        card = DatasetCard.load(path if path.is_file() else dataset_name, repo_type="dataset",
                                **({"revision": revision} if revision and not path.is_file() else {}))
    except Exception as e:  # noqa: BLE001 - no card, offline, private: the encoding is unknown, not an error
        logger.warning("dataset %s: cannot read its card (%s); render encoding unknown", dataset_name, e)
        return None
    meta = card.data.to_dict().get("ctiqa") or {}
    enc = meta.get("encoding") if isinstance(meta, dict) else None
    if isinstance(enc, dict):
        enc = enc.get("name")
    if not enc:
        m = re.search(r"rendered with encoding `([\w.-]+)`", card.text)
        enc = m.group(1) if m else None
    return enc
