"""ctiqa_iqa: correlation and error metrics of predicted vs radiologists' CT image-quality scores (0-4).

An ``evaluate`` metric module, loaded by local path (works offline)::

    import evaluate
    metric = evaluate.load("ctiqa/metrics/ctiqa_iqa")       # the folder holding this file
    metric.compute(predictions=[2.1, None, 3.4], references=[2.0, 1.2, 3.6], n_bootstrap=1000, seed=0)

It is also importable as ``ctiqa.metrics.ctiqa_iqa.ctiqa_iqa`` for :func:`iqa_metrics` and :func:`paired_bootstrap`.
The file is self-contained (numpy, scipy, datasets, evaluate), imports one per line: ``evaluate`` copies it into
its module cache and scans its imports with a regex.

Metrics (LDCTIQA 2023 challenge, Lee et al., Medical Image Analysis 99, 103343, 2025; scipy.stats):
- ``srcc`` Spearman rank correlation (``scipy.stats.spearmanr``), ``plcc`` Pearson linear correlation
  (``pearsonr``), ``krcc`` Kendall tau-b (``kendalltau``), ``overall`` = |PLCC| + |SRCC| + |KRCC| (the
  challenge's ranking score, at most 3);
- ``mae`` mean absolute error and ``rmse`` root mean squared error, in score units;
- ``n`` pairs given, ``n_valid`` pairs used, ``n_missing`` predictions that are None/NaN (no score: absent, unparsed or a failed call),
  ``parse_failure_rate`` = n_missing / n. Missing predictions are counted and excluded, never scored as 0.
- ``<metric>_ci``: percentile bootstrap interval (Efron & Tibshirani 1993) at ``confidence`` (default 0.95) over
  ``n_bootstrap`` resamples (default 1000) of the valid pairs, seeded (``seed``, default 0), drawn by
  ``scipy.stats.bootstrap`` (``paired=True``, one vector-valued statistic): the same resampled indices serve every
  metric, and :func:`paired_bootstrap` draws the same ones for both prediction sets; resamples where a correlation
  is undefined (constant values) are left out of its interval.

Undefined values (fewer than 2 valid pairs, constant predictions or references) are None and explained in
``warnings``: the result never holds NaN or infinity, so ``json.dumps(result, allow_nan=False)`` works.
"""

import math
import warnings

import datasets
import evaluate
import numpy as np
from scipy import stats

_CITATION = """\
@article{lee2025ldctiqa,
  title={Low-dose computed tomography perceptual image quality assessment},
  author={Lee, Wonkyeong and Wagner, Fabian and Galdran, Adrian and others},
  journal={Medical Image Analysis}, volume={99}, pages={103343}, year={2025}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float or None): predicted scores; None or NaN = parse failure (counted, excluded).
    references (list of float): true scores (e.g. mean radiologist rating, 0-4).
    n_bootstrap (int): bootstrap resamples for the intervals (default 1000; 0 = no intervals).
    confidence (float): interval level (default 0.95).
    seed (int): seed of the resampling (default 0).
Returns:
    dict: srcc, plcc, krcc, overall, mae, rmse (float or None), <name>_ci ([low, high] or None), n, n_valid,
    n_missing, parse_failure_rate, n_bootstrap, confidence, seed, warnings (list of str).
Examples:
    >>> metric = evaluate.load("ctiqa/metrics/ctiqa_iqa")
    >>> r = metric.compute(predictions=[1.0, 2.0, None, 4.0], references=[1.2, 1.8, 3.0, 3.6], n_bootstrap=0)
    >>> r["srcc"], r["n_missing"]
    (1.0, 1)
"""

METRICS = ("srcc", "plcc", "krcc", "overall", "mae", "rmse")


def _clean(x):
    """float -> float, NaN/inf -> None (strict JSON)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _valid_pairs(predictions, references):
    p = np.array([np.nan if v is None else float(v) for v in predictions], dtype=np.float64)
    r = np.array([np.nan if v is None else float(v) for v in references], dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"{p.size} predictions but {r.size} references")
    if np.isnan(r).any():
        raise ValueError("references hold None/NaN: every sample needs a true score")
    ok = np.isfinite(p)
    return p[ok], r[ok], int((~ok).sum())


def _point(p, r):
    """All METRICS on valid pairs (arrays of equal length); NaN where undefined."""
    out = dict.fromkeys(METRICS, np.nan)
    if p.size == 0:
        return out
    err = p - r
    out["mae"] = float(np.mean(np.abs(err)))
    out["rmse"] = float(np.sqrt(np.mean(err**2)))
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(r) == 0:
        return out
    out["srcc"] = float(stats.spearmanr(p, r).statistic)
    out["plcc"] = float(stats.pearsonr(p, r).statistic)
    out["krcc"] = float(stats.kendalltau(p, r).statistic)
    out["overall"] = abs(out["plcc"]) + abs(out["srcc"]) + abs(out["krcc"])
    return out


def _bootstrap_distribution(samples, statistic, n_bootstrap, seed):
    """``scipy.stats.bootstrap`` distribution of a vector-valued ``statistic(*arrays) -> (k,)`` over paired
    resamples of ``samples`` (shape (k, n_bootstrap)). Its own interval is not used: it is NaN as soon as one
    resample is undefined (a constant resample of a small set), where ours leaves such resamples out
    (:func:`_interval`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(samples, statistic, paired=True, vectorized=False, n_resamples=n_bootstrap,
                              method="percentile", rng=np.random.default_rng(seed))
    return np.atleast_2d(res.bootstrap_distribution)


def _interval(values, confidence):
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < max(10, 0.5 * len(values)):
        return None
    alpha = (1.0 - confidence) / 2.0
    return [float(np.quantile(v, alpha)), float(np.quantile(v, 1.0 - alpha))]


def iqa_metrics(predictions, references, n_bootstrap=1000, confidence=0.95, seed=0):
    """The metric dict described in the module docstring (the body of ``ctiqa_iqa.compute``).

    Args:
        predictions: sequence of float or None (None/NaN = parse failure). references: sequence of float, same length.
    Raises:
        ValueError: lengths differ, or a reference is None/NaN.
    """
    p, r, n_missing = _valid_pairs(predictions, references)
    n = p.size + n_missing
    notes = []
    if n_missing:
        notes.append(f"{n_missing} of {n} predictions have no score: excluded from the metrics")
    if p.size == 0:
        notes.append("no valid predictions: every metric is null")
    elif p.size < 2:
        notes.append("fewer than 2 valid predictions: correlations are null")
    elif np.ptp(p) == 0:
        notes.append(f"predictions are constant ({p[0]:g}): correlations are undefined (null)")
    elif np.ptp(r) == 0:
        notes.append("references are constant: correlations are undefined (null)")
    point = _point(p, r)
    result = {k: _clean(v) for k, v in point.items()}
    negative = [f"{k.upper()} {result[k]:.3f}" for k in ("srcc", "plcc", "krcc") if (result[k] or 0.0) < 0]
    if negative:  # the challenge's overall takes absolute values: a reversed ranking would look as good
        notes.append(f"negative correlation ({', '.join(negative)}): the predictions rank the images in reverse; "
                     "overall (|PLCC| + |SRCC| + |KRCC|) counts it as if it were positive")
    for k in METRICS:
        result[f"{k}_ci"] = None
    if n_bootstrap and p.size >= 2:
        boot = _bootstrap_distribution((p, r), lambda a, b: np.array(list(_point(a, b).values())), n_bootstrap,
                                       seed)
        for i, k in enumerate(METRICS):
            if result[k] is not None:
                result[f"{k}_ci"] = _interval(boot[i], confidence)
    result.update({
        "n": int(n), "n_valid": int(p.size), "n_missing": int(n_missing),
        "parse_failure_rate": (n_missing / n) if n else None,
        "n_bootstrap": int(n_bootstrap), "confidence": float(confidence), "seed": int(seed), "warnings": notes,
    })
    return result


def paired_bootstrap(predictions_a, predictions_b, references, metric="srcc", n_bootstrap=1000, confidence=0.95,
                     seed=0):
    """Paired bootstrap test of ``metric(a) - metric(b)`` on the same samples.

    Pairs where either prediction is missing are dropped; the same resampled indices are applied to both sets.

    Args:
        predictions_a, predictions_b: aligned sequences of float or None. references: true scores, aligned.
        metric: one of srcc, plcc, krcc, overall, mae, rmse.
    Returns:
        dict: metric, n (pairs used), a, b (point values), difference (a - b), ci ([low, high] of the difference
        or None), p_value (two-sided: 2·min(P*(d ≤ 0), P*(d ≥ 0)) over the bootstrap distribution, capped at 1;
        None when undefined), n_bootstrap, confidence, seed. No NaN.
    Raises:
        ValueError: unknown metric or misaligned inputs.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not (len(predictions_a) == len(predictions_b) == len(references)):
        raise ValueError("predictions_a, predictions_b and references must be aligned (same length)")
    a = np.array([np.nan if v is None else float(v) for v in predictions_a], dtype=np.float64)
    b = np.array([np.nan if v is None else float(v) for v in predictions_b], dtype=np.float64)
    r = np.array(references, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(r)
    a, b, r = a[ok], b[ok], r[ok]
    va, vb = _point(a, r)[metric], _point(b, r)[metric]
    out = {"metric": metric, "n": int(a.size), "a": _clean(va), "b": _clean(vb), "difference": _clean(va - vb),
           "ci": None, "p_value": None, "n_bootstrap": int(n_bootstrap), "confidence": float(confidence),
           "seed": int(seed)}
    if out["difference"] is None or not n_bootstrap or a.size < 2:
        return out
    diffs = _bootstrap_distribution((a, b, r), lambda x, y, t: np.array([_point(x, t)[metric] - _point(y, t)[metric]]),
                                    n_bootstrap, seed)[0]  # the same resampled ids for a and b
    d = diffs[np.isfinite(diffs)]
    out["ci"] = _interval(diffs, confidence)
    if d.size:
        out["p_value"] = float(min(1.0, 2.0 * min(np.mean(d <= 0), np.mean(d >= 0))))
    return out


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class CtiqaIqa(evaluate.Metric):
    """SRCC, PLCC, KRCC, overall, MAE, RMSE with bootstrap intervals and parse-failure counts (see module doc)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("float64"),
                "references": datasets.Value("float64"),
            }),
            reference_urls=["https://doi.org/10.1016/j.media.2024.103343", "https://zenodo.org/records/7833096"],
        )

    def _compute(self, predictions, references, n_bootstrap=1000, confidence=0.95, seed=0):
        return iqa_metrics(predictions, references, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
