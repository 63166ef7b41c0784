"""``ctiqa report``: a Table-1-style markdown comparison of several ``ctiqa evaluate`` result folders.

Each folder holds ``results.json`` and ``predictions.jsonl``. Every score kind a folder has (``parsed``: read from
the generated text; ``probability``: expected score from digit-token probabilities) becomes one row with SRCC,
PLCC, KRCC, MAE and the LDCTIQA overall (|PLCC| + |SRCC| + |KRCC|), each with its 95 % bootstrap interval, the
coverage (samples with a usable score / samples in the split) and the failures by cause. When the rows did not score
the same ids (a ``--limit`` run, parse failures, a failed API call), a second table gives every row's metrics on
the ids all rows scored, and the best row is named only from those: a row that scored half the ids is never
called "highest SRCC" on its own easier half. Below, every row is compared with the first row by a paired
bootstrap test on the ids both share (:func:`ctiqa.metrics.ctiqa_iqa.ctiqa_iqa.paired_bootstrap`): the SRCC
difference with its interval and a two-sided p-value. With n = 100 an SRCC of 0.80 has an interval about
[0.71, 0.86] wide (design.md §3): differences smaller than that are rarely significant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ctiqa import CTIQAError
from ctiqa.evaluation import PREDICTIONS_FILE, RESULTS_FILE, RESULTS_SCHEMA
from ctiqa.metrics.ctiqa_iqa.ctiqa_iqa import iqa_metrics, paired_bootstrap
from ctiqa.paths import atomic_write, check_output_path

_COLUMNS = {"parsed": "parsed_score", "probability": "prob_score"}
_METRICS = (("srcc", "SRCC ↑"), ("plcc", "PLCC ↑"), ("krcc", "KRCC ↑"), ("mae", "MAE ↓"), ("overall", "Overall ↑"))


def load_result_dir(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results.json, predictions.jsonl rows) of one ``ctiqa evaluate`` output folder.

    Raises:
        CTIQAError: a file is missing or not valid JSON, or ``results.json`` does not match
            :data:`ctiqa.evaluation.RESULTS_SCHEMA` (names the file and the field); ``predictions.jsonl`` changed since
            ``results.json`` was computed from it (its recorded ``files.predictions_sha256``).
    """
    d = Path(path)
    res_file, pred_file = d / RESULTS_FILE, d / PREDICTIONS_FILE
    for f in (res_file, pred_file):
        if not f.is_file():
            raise CTIQAError(f"{d}: no {f.name} (is this a `ctiqa evaluate --out` folder?)")
    try:
        results = json.loads(res_file.read_text())
        rows = [json.loads(line) for line in pred_file.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise CTIQAError(f"{d}: bad JSON in results.json or predictions.jsonl ({e}); a run killed while writing "
                         "leaves it so: run the same `ctiqa evaluate` again to finish it") from e
    from ctiqa.clients import schema_errors

    if problems := schema_errors(results, RESULTS_SCHEMA):  # a hand-edited or foreign file: one line, no traceback
        raise CTIQAError(f"{res_file}: not a ctiqa evaluate result ({problems[0]})")
    if bad := next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None):
        raise CTIQAError(f"{pred_file}: row {bad} is not a JSON object")
    recorded = (results.get("files") or {}).get("predictions_sha256")
    n = (results.get("counts") or {}).get("n")  # results written before the sha256 was recorded: the count at least
    if (recorded and recorded != hashlib.sha256(pred_file.read_bytes()).hexdigest()) or \
            (not recorded and isinstance(n, int) and n != len(rows)):
        raise CTIQAError(f"{pred_file}: changed since {res_file.name} was computed from it (its metrics would not be "
                         "these rows'); run the same `ctiqa evaluate` with --overwrite to recompute them")
    return results, rows


def _cell(m: dict[str, Any], k: str) -> str:
    v, ci = m.get(k), m.get(f"{k}_ci")
    if v is None:
        return "n/a"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def build_rows(dirs: list[str | Path], names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (folder, score kind): name, kind, metrics, {id: (true, predicted)}, dataset/split.

    Raises:
        CTIQAError: ``names`` given but not one per folder.
    """
    if names and len(names) != len(dirs):
        raise CTIQAError(f"--names: {len(names)} names for {len(dirs)} folders")
    rows = []
    for i, d in enumerate(dirs):
        results, preds = load_result_dir(d)
        name = (names[i] if names else results.get("name") or Path(d).name).replace("|", "\\|")  # a table cell
        kinds = [k for k in ("probability", "parsed") if k in results["metrics"]]
        primary = results.get("primary_score")
        kinds.sort(key=lambda k: k != primary)
        for kind in kinds:
            col = _COLUMNS[kind]
            m = results["metrics"][kind]
            rows.append({
                "name": name, "kind": kind, "dir": str(d), "metrics": m,
                "n_split": (results.get("counts") or {}).get("n_split") or m.get("n"),
                "failures": results.get("failures") if kind == "parsed" else None,
                "dataset": results.get("dataset"), "split": results.get("split"),
                "pairs": {str(r["id"]): (float(r["score"]), r.get(col)) for r in preds},
                "explanation_check": results.get("explanation_check") if kind == kinds[0] else None,
                "rationale_consistency": results.get("rationale_consistency") if kind == kinds[0] else None,
                "first_kind": kind == kinds[0], "faithfulness": results.get("faithfulness") if kind == kinds[0] else None,
            })
    if not names:  # runs/ft/model and runs/qlora/model are both "model": name each by its folder's path too
        by_name: dict[str, set[str]] = {}
        for r in rows:
            by_name.setdefault(r["name"], set()).add(r["dir"])
        for r in rows:
            if len(by_name[r["name"]]) > 1:
                r["name"] = f"{r['name']} ({r['dir']})".replace("|", "\\|")
    return rows


def check_same_reference(rows: list[dict[str, Any]]) -> None:
    """Refuse rows that were not evaluated against the same reference: an id two rows both hold with different
    true scores means two datasets (or splits) whose ids overlap, and comparing them on "common ids" would compare
    different images. Rows whose dataset or split is named otherwise but whose true scores agree get a warning.

    Raises:
        CTIQAError: naming the two rows, how many common ids disagree and one example.
    """
    first = rows[0] if rows else None
    for r in rows[1:]:
        common = first["pairs"].keys() & r["pairs"].keys()
        bad = sorted(i for i in common if abs(first["pairs"][i][0] - r["pairs"][i][0]) > 1e-6)
        if bad:
            i = bad[0]
            raise CTIQAError(f"{first['dir']} and {r['dir']} give {len(bad)} of their {len(common)} common ids "
                             f"different reference scores (id {i}: {first['pairs'][i][0]:g} vs {r['pairs'][i][0]:g}): "
                             "they were evaluated on different datasets or splits; report them separately")
        if (r["dataset"], r["split"]) != (first["dataset"], first["split"]):
            print(f"warning: {r['dir']} was evaluated on {r['dataset']} / {r['split']}, {first['dir']} on "
                  f"{first['dataset']} / {first['split']}; their reference scores agree on the common ids",
                  file=sys.stderr)


def _valid(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def common_ids(rows: list[dict[str, Any]]) -> list[str]:
    """Ids that every row scored (a finite prediction) with the same true score, in the first row's order."""
    if not rows:
        return []
    first = rows[0]["pairs"]
    return [i for i, (t, p) in first.items() if _valid(p) and all(
        i in r["pairs"] and _valid(r["pairs"][i][1]) and abs(r["pairs"][i][0] - t) < 1e-6 for r in rows[1:])]


def coverage(row: dict[str, Any]) -> str:
    """``"scored / in split (percent)"`` of one row."""
    n_valid, n_split = row["metrics"].get("n_valid"), row.get("n_split")
    if n_valid is None or not n_split:
        return "n/a"
    return f"{n_valid} / {n_split} ({n_valid / n_split:.0%})"


def failures(row: dict[str, Any]) -> str:
    """Samples without a score, with their causes when known: ``"3 (1 connection, 2 no score)"``."""
    n = row["metrics"].get("n_missing")
    causes = {k: v for k, v in (row.get("failures") or {}).items() if v}
    if not n or not causes:
        return str(n)
    return f"{n} (" + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in causes.items()) + ")"


def compare(ref: dict[str, Any], row: dict[str, Any], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Paired bootstrap of SRCC(row) - SRCC(ref) on common ids with the same true score."""
    common = [i for i in ref["pairs"] if i in row["pairs"] and abs(ref["pairs"][i][0] - row["pairs"][i][0]) < 1e-6]
    return paired_bootstrap([row["pairs"][i][1] for i in common], [ref["pairs"][i][1] for i in common],
                            [ref["pairs"][i][0] for i in common], metric="srcc", n_bootstrap=n_bootstrap, seed=seed)


def render_markdown(rows: list[dict[str, Any]], *, n_bootstrap: int = 1000, seed: int = 0,
                    title: str = "CT image quality: agreement with the reference scores") -> str:
    """The report as markdown: the metrics table, which row agrees best, the paired comparisons with the first
    row, explanation checks. (The reference scores are radiologists' on LDCTIQA, synthetic on simulated data.)"""
    lines = [f"# {title}", ""]
    head = ["Model", "Score", "Scored / in split", "Failures", *(h for _, h in _METRICS)]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        m = r["metrics"]
        lines.append("| " + " | ".join([r["name"], r["kind"], coverage(r), failures(r),
                                        *(_cell(m, k) for k, _ in _METRICS)]) + " |")
    # each folder's intervals come from its own evaluate run: say so when their settings differ
    settings = {(r["metrics"].get("confidence", 0.95), r["metrics"].get("n_bootstrap")) for r in rows}
    if len(settings) == 1:
        conf, nb = next(iter(settings))
        how = f"{conf:.0%} percentile-bootstrap intervals ({nb} resamples, seeded)"
    else:
        how = "percentile-bootstrap intervals of each evaluation's own settings (" + "; ".join(dict.fromkeys(
            f"{r['name']}: {r['metrics'].get('confidence', 0.95):.0%}, {r['metrics'].get('n_bootstrap')} resamples"
            for r in rows)) + ")"
    lines += ["", f"Values with {how}. Overall = |PLCC| + |SRCC| + |KRCC| (LDCTIQA 2023 challenge). Failures (no "
              "usable score: server not reached, API error, answer without a score, missing) are counted by cause "
              "and left out of the metrics. parsed = score read from the generated text; "
              "probability = expected score from the digit-token probabilities." if rows else ""]
    for r in rows:  # Overall takes absolute values (the challenge's definition): say where that flatters
        neg = [f"{k.upper()} {r['metrics'][k]:.3f}" for k in ("srcc", "plcc", "krcc")
               if isinstance(r["metrics"].get(k), (int, float)) and r["metrics"][k] < 0]
        if neg:
            lines += ["", f"**Negative correlation**: {r['name']} ({r['kind']}) has {', '.join(neg)}: it ranks the "
                      "images in reverse; its Overall counts the absolute values, as the challenge does."]
    # A row with no usable score at all (e.g. an untrained model's text: every answer unparsable) has nothing to
    # compare: it stays in the table above with its failures, but must not empty the common ids of the others.
    scoring = [r for r in rows if r["metrics"].get("n_valid")]
    common = common_ids(scoring)
    same = all(r["metrics"].get("n_valid") == len(common) for r in scoring)  # every row scored the same ids
    basis = {id(r): r["metrics"] for r in rows}
    if scoring and not same:
        left_out = [f"{r['name']} ({r['kind']})" for r in rows if r not in scoring]
        lines += ["", f"## On the {len(common)} ids every row scored", "",
                  "The rows above did not score the same ids (coverage differs), so their values are not comparable; "
                  "here every row is measured on the ids all rows scored"
                  + (f" (left out, no usable score: {', '.join(left_out)})." if left_out else "."), "",
                  "| Model | Score | n | " + " | ".join(h for _, h in _METRICS) + " |",
                  "|---|---|---:|" + "---:|" * len(_METRICS)]
        for r in scoring:
            m = iqa_metrics([r["pairs"][i][1] for i in common], [r["pairs"][i][0] for i in common],
                            n_bootstrap=n_bootstrap, seed=seed)
            basis[id(r)] = m
            lines.append("| " + " | ".join([r["name"], r["kind"], str(len(common)),
                                            *(_cell(m, k) for k, _ in _METRICS)]) + " |")
    ranked = [r for r in scoring if _valid(basis[id(r)].get("srcc"))]
    if len(rows) > 1 and ranked and len(common) >= 2:
        top = max(basis[id(r)]["srcc"] for r in ranked)
        best = [r for r in ranked if round(basis[id(r)]["srcc"], 3) == round(top, 3)]  # equal as shown: a tie
        where = "" if same else f" on the {len(common)} ids every row scored"
        names = " and ".join(f"**{r['name']}** ({r['kind']})" for r in best)
        lines += ["", f"Highest SRCC{where}: {names}{' (a tie)' if len(best) > 1 else ''}, {top:.3f}."]
    elif len(rows) > 1:
        lines += ["", f"No row is named best: the rows share {len(common)} scored id(s)."]
    if len(rows) > 1:
        ref = rows[0]
        lines += ["", f"## Paired comparison with {ref['name']} ({ref['kind']})", "",
                  "| Model | Score | common n | ΔSRCC (row − reference) | 95% CI | p |", "|---|---|---:|---:|---:|---:|"]
        for r in rows[1:]:
            c = compare(ref, r, n_bootstrap, seed)
            ci = "n/a" if c["ci"] is None else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
            diff = "n/a" if c["difference"] is None else f"{c['difference']:+.3f}"
            p = c["p_value"]
            p_txt = f"< {1 / n_bootstrap:.2g}" if p == 0.0 else _num(p)  # 0 of n_bootstrap resamples crossed 0
            lines.append(f"| {r['name']} | {r['kind']} | {c['n']} | {diff} | {ci} | {p_txt} |")
        lines += ["", "Paired bootstrap over the ids both rows scored (the same resamples for both); p is "
                  "two-sided, from the bootstrap distribution of the difference."]
    expl = [r for r in rows if r.get("explanation_check")]
    if expl:
        lines += ["", "## Explanation check (simulated data, keyword rubric: ctiqa.explanations)", "",
                  "| Model | rationales | degradation named | severity matches | false streaks |",
                  "|---|---:|---:|---:|---:|"]
        for r in expl:
            e = r["explanation_check"]
            lines.append(f"| {r['name']} | {e['n_checked']} | {_num(e['degradation_named_rate'], 2)} | "
                         f"{_num(e['severity_match_rate'], 2)} | {_num(e['false_streak_rate'], 2)} |")
    cons = [r for r in rows if (r.get("rationale_consistency") or {}).get("n_rationales")]
    if cons:
        lines += ["", "## Rationale-score consistency (any data: does the stated overall quality agree with the "
                  "model's own score? ctiqa.explanations)", "",
                  "| Model | rationales | overall quality stated | agrees with its score |", "|---|---:|---:|---:|"]
        for r in cons:
            c = r["rationale_consistency"]
            lines.append(f"| {r['name']} | {c['n_rationales']} | {_num(c['stated_rate'], 2)} | "
                         f"{_num(c['consistent_rate'], 2)} |")
    lines += faithfulness_lines(rows)
    sources = sorted({f"{r['dataset']} / {r['split']}" for r in rows if r.get("dataset")})
    if sources:
        lines += ["", "Data: " + "; ".join(sources)]
    return "\n".join(lines) + "\n"


def faithfulness_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The "Faithfulness to measured findings" section (ctiqa.explanations.faithfulness): one line per model,
    "no rationale" for a model that writes none (e.g. the noise-sigma baseline); empty when no model has one."""
    firsts = [r for r in rows if r.get("first_kind", True)]
    if not any(r.get("faithfulness") for r in firsts):
        return []
    out = ["", "## Faithfulness to measured findings (any data: rationale claims vs ctiqa.findings of the image)", "",
           "| Model | rationales | noise addressed | noise class agrees (within one band) | streaks addressed | "
           "streak claim agrees with measured call* | unverified artifacts | same verdict as truth rubric |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in firsts:
        f = r.get("faithfulness")
        if not f:
            out.append(f"| {r['name']} | no rationale | | | | | | |")
            continue
        t = f.get("agreement_with_truth_rubric") or {}
        truth = (f"noise {_num(t.get('noise_agree_rate'), 2)}, streaks {_num(t.get('streaks_agree_rate'), 2)}"
                 if t else "n/a (no simulator truth)")
        out.append(f"| {r['name']} | {f['n_measured']} | {_num(f['noise_addressed_rate'], 2)} | "
                   f"{_num(f['noise_agreement_rate'], 2)} ({_num(f['noise_within_one_band_rate'], 2)}) | "
                   f"{_num(f['streaks_addressed_rate'], 2)} | {_num(f['streak_agreement_rate'], 2)} | "
                   f"{_num(f['unverified_rate'], 2)} | {truth} |")
    validated = [f.get("streak_call_validated") for r in firsts if (f := r.get("faithfulness"))]
    call = ("*The measured streak call is validated on simulation only (bench/bench_findings.py --independent: "
            "sparse-view periodicity, issue 11's bar); on real data it is a measurement, not truth; on simulated "
            "data the truth rubric above is the reference." if validated and all(validated) else
            "*The measured streak call is not validated (bench/bench_findings.py): streak claims are "
            "\"unverified\" on real data; on simulated data the truth rubric above stands in.")
    out += ["", call + " Unverified artifacts: ring, motion, metal or beam hardening claimed; LDCTIQA and the "
            "simulator add none (unverifiable, not wrong)."]
    return out


# ---------------------------------------------------------------------------------------------------- CLI
#: Last line of every report (an HTML comment: invisible when rendered); an existing --out without it is not ours.
REPORT_MARKER = "<!-- written by ctiqa report -->"


def is_report(path: Path) -> bool:
    """True when ``path`` is a report ``ctiqa report`` wrote (:data:`REPORT_MARKER`, or the title line of reports
    written before the marker existed), so that ``--out`` may replace it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return REPORT_MARKER in text or text.startswith("# CT image quality: agreement with the reference scores\n")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ctiqa report``."""
    from ctiqa.cli import non_negative_int

    parser.add_argument("dirs", nargs="+", help="ctiqa evaluate output folders (the first is the reference)")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--names", nargs="+", help="one display name per folder")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, help="paired bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default 0)")


def unique_dirs(dirs: list[str], names: list[str] | None = None) -> tuple[list[str], list[str] | None]:
    """``dirs`` (and their ``names``) without repeats of one folder however spelt (``run``, ``./run/``, an absolute
    path, a symlink: compared by resolved path), the first kept; each repeat is said on stderr, so that a row is
    never compared with itself."""
    seen: dict[str, str] = {}
    keep = []
    for i, d in enumerate(dirs):
        key = os.path.realpath(os.path.expanduser(d))
        if key in seen:
            print(f"warning: {d} is {seen[key]} again: reported once", file=sys.stderr)
            continue
        seen[key] = d
        keep.append(i)
    return [dirs[i] for i in keep], [names[i] for i in keep] if names else names


def cli_main(args: argparse.Namespace) -> int:
    """``ctiqa report DIR [DIR ...] --out FILE.md [--names ...]``: write and print the comparison."""
    check_output_path(args.out, ours=is_report, hint="Give a new .md file (or an earlier `ctiqa report` output)",
                      inputs=[Path(d) / f for d in args.dirs for f in (RESULTS_FILE, PREDICTIONS_FILE)])
    if args.names and len(args.names) != len(args.dirs):
        raise CTIQAError(f"--names: {len(args.names)} names for {len(args.dirs)} folders")
    dirs, names = unique_dirs(args.dirs, args.names)
    rows = build_rows(dirs, names)
    check_same_reference(rows)
    if not rows:
        raise CTIQAError("no metrics in the given folders")
    text = render_markdown(rows, n_bootstrap=args.bootstrap, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as f:
        f.write(text + REPORT_MARKER + "\n")
    print(text)
    print(f"wrote {args.out}")
    return 0
