"""Evaluation plots (matplotlib, Agg backend: no display needed): predicted vs true scatter and Bland-Altman.

One panel per score kind (``parsed``: the score read from the generated text; ``probability``: the expected
score from digit-token probabilities). Missing predictions (parse failures) are left out and counted in the
panel title. Scores are on the LDCTIQA 0-4 scale (Lee et al. 2025).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctiqa.scale import SCORE_MAX, SCORE_MIN

#: Bland-Altman limits of agreement: mean difference ± 1.96 SD (Bland & Altman, Lancet 1986).
LOA_Z = 1.96


def _pairs(true: list[float], pred: list[float | None]) -> tuple[np.ndarray, np.ndarray, int]:
    ok = [(t, p) for t, p in zip(true, pred, strict=True) if p is not None]
    t = np.array([a for a, _ in ok], dtype=np.float64)
    p = np.array([b for _, b in ok], dtype=np.float64)
    return t, p, len(true) - len(ok)


def _save(plt, fig, out: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def _figure(n_panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 4.4), squeeze=False)
    return plt, fig, axes[0]


def scatter_plot(true: list[float], preds: dict[str, list[float | None]], out: str | Path,
                 title: str = "", stats: dict[str, dict] | None = None) -> Path:
    """Predicted vs true score, one panel per entry of ``preds``, with the identity line.

    Args:
        true: true scores (0-4). preds: kind -> predictions aligned with ``true`` (None = missing).
        out: PNG path. title: figure title. stats: kind -> metrics dict (``srcc``, ``plcc``) shown in the panel title.
    Returns:
        the PNG path.
    """
    plt, fig, axes = _figure(len(preds))
    for ax, (kind, pred) in zip(axes, preds.items(), strict=True):
        t, p, missing = _pairs(true, pred)
        ax.plot([SCORE_MIN, SCORE_MAX], [SCORE_MIN, SCORE_MAX], color="0.5", lw=1, ls="--", label="identity")
        ax.scatter(t, p, s=14, alpha=0.7, edgecolor="none")
        m = (stats or {}).get(kind) or {}
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        ax.set_title(f"{kind}: SRCC {fmt(m.get('srcc'))}, PLCC {fmt(m.get('plcc'))}"
                     + (f"\n{missing} missing" if missing else ""), fontsize=10)
        ax.set_xlim(SCORE_MIN - 0.1, SCORE_MAX + 0.1)
        ax.set_ylim(SCORE_MIN - 0.1, SCORE_MAX + 0.1)
        ax.set_aspect("equal")
        ax.set_xlabel("true score (0-4)")
        ax.set_ylabel("predicted score")
        ax.grid(alpha=0.3)
    return _save(plt, fig, out, title)


def bland_altman_plot(true: list[float], preds: dict[str, list[float | None]], out: str | Path,
                      title: str = "") -> Path:
    """Bland-Altman plot: difference (predicted - true) vs mean of the two, with the bias and ±1.96 SD limits.

    Args and return as :func:`scatter_plot`.
    """
    plt, fig, axes = _figure(len(preds))
    for ax, (kind, pred) in zip(axes, preds.items(), strict=True):
        t, p, missing = _pairs(true, pred)
        mean, diff = (t + p) / 2.0, p - t
        ax.scatter(mean, diff, s=14, alpha=0.7, edgecolor="none")
        if diff.size:
            bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
            ax.axhline(bias, color="C3", lw=1.2, label=f"bias {bias:+.2f}")
            for s in (-1, 1):
                ax.axhline(bias + s * LOA_Z * sd, color="C3", lw=1, ls="--")
            ax.set_title(f"{kind}: bias {bias:+.2f}, limits ±{LOA_Z * sd:.2f}"
                         + (f"\n{missing} missing" if missing else ""), fontsize=10)
        else:
            ax.set_title(f"{kind}: no valid predictions", fontsize=10)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xlim(SCORE_MIN - 0.1, SCORE_MAX + 0.1)
        ax.set_xlabel("mean of predicted and true score")
        ax.set_ylabel("predicted - true")
        ax.grid(alpha=0.3)
    return _save(plt, fig, out, title)


def series_plot(rows: list[dict], out: str | Path | None = None, title: str = "", worst: list[int] | None = None):
    """Score along a series: the probability score (± its std) and the parsed score per slice index.

    Args:
        rows: slice rows of ONE series as written by ``ctiqa predict`` (``slice``: 0-based index in the series,
            ordered along the slice normal; ``prob_score``/``prob_std``/``parsed_score`` on the 0-4 scale, None
            when not computed).
        out: PNG path, or None to return the open matplotlib figure (for Gradio's ``gr.Plot``).
        title: figure title. worst: slice indices to mark (the series summary's worst slices).
    Returns:
        the PNG path, or the figure when ``out`` is None.
    """
    plt, fig, axes = _figure(1)
    ax = axes[0]
    fig.set_size_inches(7.0, 3.2)
    rows = sorted(rows, key=lambda r: r["slice"])
    idx = np.array([r["slice"] for r in rows], dtype=np.float64)
    prob = np.array([np.nan if r.get("prob_score") is None else r["prob_score"] for r in rows], dtype=np.float64)
    std = np.array([0.0 if r.get("prob_std") is None else r["prob_std"] for r in rows], dtype=np.float64)
    parsed = np.array([np.nan if r.get("parsed_score") is None else r["parsed_score"] for r in rows],
                      dtype=np.float64)
    if np.isfinite(prob).any():
        ax.plot(idx, prob, marker="o", ms=3, lw=1.2, label="probability score")
        ax.fill_between(idx, prob - std, prob + std, alpha=0.2, lw=0, label="± std")
    if np.isfinite(parsed).any():
        ax.plot(idx, parsed, ls="none", marker="x", ms=5, color="C1", label="parsed score")
    for i in worst or []:
        ax.axvline(i, color="C3", lw=0.8, ls=":")
    ax.set_ylim(SCORE_MIN - 0.1, SCORE_MAX + 0.1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("slice (index along the slice normal)")
    ax.set_ylabel("score (0 bad - 4 excellent)")
    ax.grid(alpha=0.3)
    if len(idx):
        ax.set_xlim(idx.min() - 0.5, idx.max() + 0.5)
        ax.legend(fontsize=8, loc="best")
    if out is None:
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        return fig
    return _save(plt, fig, out, title)
