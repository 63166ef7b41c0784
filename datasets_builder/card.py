"""The dataset card (README.md): our metadata merged with the YAML ``datasets`` writes, plus a provenance body.

The YAML header is built in two steps: our fields (licence, task category, tags, annotation creators, size
category, pretty name) go into a :class:`huggingface_hub.DatasetCardData`; then every field of the card data
given (on the Hub: the ``dataset_info`` and ``configs`` that ``DatasetDict.push_to_hub`` wrote) is added, so
neither overwrites the other, and a later ``push_to_hub`` into the same repo keeps our fields and body.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from ctiqa.vocabulary import OTHER_ARTIFACTS

LICENSE_NOTE = (
    "**Licence: check it yourself.** The LDCTIQA 2023 data are described as CC BY-NC-SA 4.0 in some sources and "
    "CC BY 4.0 in others (Zenodo record 7833096 and the challenge pages disagree). This card therefore says "
    "`license: other`. Check the licence of the source data on Zenodo before you use or redistribute this "
    "dataset; the rationales are machine-generated and inherit the source terms and the teacher provider's "
    "terms of use."
)
LICENSE_NOTE_SIMULATED = (
    "**Licence: check it yourself.** The images are simulated from CT slices shipped with the `pydicom` / "
    "`pydicom-data` test files (public TCIA collections and the pydicom project); check the licence of each "
    "source file before redistribution. Scores and rationales are synthetic."
)

CITATION = """\
```bibtex
@inproceedings{wang2026explainable,
  title     = {Explainable Radiologist-Aligned VLM for CT Image Quality Assessment},
  author    = {Wang, Jiajun and Sun, Yipeng and Bayer, Siming and Maier, Andreas},
  booktitle = {Bildverarbeitung f{\\"u}r die Medizin (BVM)},
  year      = {2026}
}
@article{lee2025ldctiqa,
  title   = {Low-dose computed tomography perceptual image quality assessment},
  author  = {Lee, Wonkyeong and others},
  journal = {Medical Image Analysis},
  volume  = {99},
  pages   = {103343},
  year    = {2025},
  doi     = {10.1016/j.media.2024.103343}
}
```
LDCTIQA 2023 data: Zenodo record 7833096 (https://zenodo.org/records/7833096)."""


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def grounding_md(g: dict | None) -> str:
    """The "Grounding" section: measured findings per row, re-asked rationales, flags of the kept ones."""
    if not g:
        return ""
    from ctiqa.findings import STREAK_CALL_VALIDATED

    flags = g.get("flags") or {}
    unverified = g.get("unverified_artifacts") or {}
    return (f"### Grounding in measured findings\n\n"
            f"Every image was measured (ctiqa.findings: noise in HU and its class, a streak index and call; columns "
            f"`noise_hu`, `noise_severity`, `streak_index`, `streaks`): {g.get('measured', 0)} measured. The teacher "
            "prompt carries the measured noise (and the simulator's streak truth on simulated data; elsewhere "
            + ("the measured streak call, validated on simulation only" if STREAK_CALL_VALIDATED else
               "no streak finding: the measured streak call is not validated")
            + ") and asks for a report consistent with it; the audit rejects rationales "
            "that contradict them (`contradicts_findings`: noise two bands off, streaks where none are; on simulated "
            "data also metal, ring or motion artifacts, which it never has). "
            f"Rejected for a fixable reason and asked again with the reason (at most {g.get('max_reasks', 0)} "
            f"times): {g.get('reasked', 0)}; of those kept: {g.get('reasked_kept', 0)}. Flags on kept rationales "
            f"(not rejected): {', '.join(f'{k} {v}' for k, v in sorted(flags.items())) or 'none'}"
            + (f"; unverifiable artifacts claimed: {', '.join(f'{k} {v}' for k, v in sorted(unverified.items()))}"
               if unverified else "") + ".")


def make_card(prov: dict[str, Any], yaml_sections: DatasetCardData) -> DatasetCard:
    """Build the dataset card.

    Args:
        prov: provenance, with keys ``source`` (str), ``synthetic`` (bool), ``teacher`` (model id or "none"),
            ``teacher_kind``, ``prompt_version``, ``target_format``, ``encoding`` (dict from
            ``ctiqa.imaging.encoding_info``), ``split`` (method), ``seed``, ``counts`` ({split: rows}),
            ``rationale_splits`` (splits whose rows carry rationales), ``status`` ({status: n}),
            ``rejections`` ({reason: n}), ``failures`` ({reason: n}), ``terms`` ({term: rationales mentioning
            it}), ``n_rationales``, ``usage`` ({prompt_tokens, output_tokens, thoughts_tokens, cost_usd or None}),
            ``ctiqa_version``.
        yaml_sections: card data to keep (on the Hub: ``dataset_info`` and ``configs`` from ``push_to_hub``).
    Returns:
        the :class:`huggingface_hub.DatasetCard`; ``str(card)`` is the README.md text.
    """
    synthetic = bool(prov["synthetic"])
    total = sum(prov["counts"].values())
    ours = {
        "license": "other",
        "license_name": "check-source-data",
        "license_link": "https://zenodo.org/records/7833096" if not synthetic else "https://github.com/pydicom/pydicom-data",
        "pretty_name": "CT image quality with rationales" + (" (simulated)" if synthetic else " (LDCTIQA 2023)"),
        "task_categories": ["image-text-to-text"],
        "tags": ["medical", "ct", "image-quality-assessment", "synthetic-rationales"]
        + (["synthetic-data"] if synthetic else []),
        "annotations_creators": ["machine-generated"] if synthetic else ["expert-generated", "machine-generated"],
        "language": ["en"],
        "size_categories": [_size_category(total)],
        "source_datasets": ["original"] if synthetic else ["extended"],
    }
    data = DatasetCardData(**ours)  # our fields first in the YAML, then datasets' dataset_info / configs
    for key, value in yaml_sections.to_dict().items():
        data[key] = value

    counts = _table([(s, n) for s, n in prov["counts"].items()], ("split", "rows"))
    status = _table(sorted(prov["status"].items()), ("status", "images")) if prov["status"] else "none"
    rej = _table(sorted(prov["rejections"].items()), ("rejection reason", "rationales")) if prov["rejections"] \
        else "No rationale was rejected."
    fails = _table(sorted(prov["failures"].items()), ("failure", "requests")) if prov["failures"] \
        else "No teacher request failed."
    n_rat = prov.get("n_rationales", 0)
    terms = _table([(t, n, f"{100 * n / n_rat:.0f} %" if n_rat else "-") for t, n in prov["terms"].items()],
                   ("artifact term", "rationales mentioning it", "share")) if prov["terms"] else ""
    absent = {t: n for t, n in prov["terms"].items() if t in OTHER_ARTIFACTS and n}
    grounding = grounding_md(prov.get("grounding"))
    usage = prov.get("usage") or {}
    cost = usage.get("cost_usd")
    enc = prov["encoding"]
    degradation = ", and the degradation: `base_slice`, `dose_fraction`, `n_views`, `synthetic`" if synthetic else ""
    scores = ("synthetic scores derived from the simulated degradation (dose fraction, number of views)"
              if synthetic else "expert scores: mean of radiologists' ratings on 0-4 (LDCTIQA 2023)")

    body = f"""
# {data['pretty_name']}

Chat-format data for fine-tuning a vision-language model to grade the technical quality of one axial CT slice on
the LDCTIQA scale (0 bad, 1 poor, 2 fair, 3 good, 4 excellent) and to explain the grade. Built with
`ctiqa build-dataset` (ctiqa {prov['ctiqa_version']}).

{LICENSE_NOTE_SIMULATED if synthetic else LICENSE_NOTE}

## Contents

{counts}

Columns: `id` (source file stem), `score` (true score, float64), `prompt` / `completion` (TRL conversational
prompt-completion format; the user turn holds `{{"type": "image"}}` and the instruction), `images` (one embedded
PNG: the RGB image the model sees), `rationale`, `teacher`, `prompt_version`, `target_format`{degradation}.
Target format `{prov['target_format']}`. Rows of splits without rationales ({', '.join(s for s in prov['counts'] if s not in prov['rationale_splits']) or 'none'})
have an empty `rationale` and a completion holding only the score line; evaluation reads `score`, not `completion`.

```python
from datasets import load_dataset
ds = load_dataset("<this repo or folder>")
```

## Provenance

- Source: {prov['source']}; {scores}.
- Images: rendered with encoding `{enc['name']}` ({enc['source']}); 8-bit RGB, PNG (lossless).
- Split: `{prov['split']}`{f" ({prov['split_reason']})" if prov.get('split_reason') not in (None, 'as asked') else ''}, seed {prov['seed']}.
- Rationales: teacher `{prov['teacher']}` ({prov['teacher_kind']}), prompt version `{prov['prompt_version']}`,
  written for splits {', '.join(prov['rationale_splits']) or 'none'}. The teacher was given the true score and asked to explain it
  post hoc from the one image the student sees (as in Wang et al., BVM 2026).
- Teacher tokens: prompt {usage.get('prompt_tokens', 0):,}, output {usage.get('output_tokens', 0):,},
  thinking {usage.get('thoughts_tokens', 0):,}{f"; estimated cost USD {cost:.2f}" if cost is not None else ""}.

### Filtering

Each rationale was cleaned (chat boilerplate, persona lines, Markdown removed) and rejected when too short,
contradicting the score, mentioning views the student never sees (crops, zoomed views, other slices) or leaking
the set-up ("was rated by a panel"). Rows whose request failed or whose rationale was rejected are left out.
Per-image details: `audit.csv` next to this card.

{status}

{rej}

{fails}

### Artifact terms in the kept rationales

{terms}

{f"Mentions of artifacts this data does not contain (likely hallucinated): {absent}." if absent else ""}

{grounding}

## Limitations

- {"Scores are synthetic and the images simulated: this data shows that a pipeline works, not how radiologists grade." if synthetic else "Scores are the mean of a few radiologists on one slice type (abdominal CT, Mayo/AAPM data) degraded by simulated low dose and sparse views; other anatomy, scanners and reconstruction kernels are not covered."}
- Rationales are machine-written post hoc given the true score; they can be fluent and wrong. The checks above
  catch some failure kinds, not all.
- Not for clinical use.

## Citation

{CITATION}
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")
