"""Can a model's vision tower tell sparse-view streaks from noise? A linear probe on pooled image features.

Fits an L2-regularised logistic regression on the TRAIN split's image features to predict "streaks applied"
(simulator truth: n_views < 512) and reports the AUC on the VALIDATION split (the test split is never read):

* ``log sigma only``: the truth's noise level (log of the expected quantum noise in HU) alone: in the simulator
  fewer views also mean more noise, so this is what a "streak" call can reach while knowing nothing of streaks;
* ``features``: the mean-pooled vision-tower output (before the projector) and the projected image tokens;
* ``features + log sigma``: what the features add beyond the noise level;
* ``residual``: the features' logit after removing what log sigma explains (a linear fit on the training split),
  as the streak measure is judged in the findings issue: 0.5 = no streak information beyond the noise level.

If ``features + log sigma`` is no better than ``log sigma only``, nothing trained on top of this vision tower can
make streak claims that are true to the image beyond what the noise level implies.

    python bench/probe_streaks.py --model runs/demo/model --dataset runs/demo/dataset
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from datasets import load_dataset
from scipy.stats import mannwhitneyu
from transformers import AutoModelForImageTextToText, AutoProcessor

from ctiqa.demo import DEMO_DATASET, DEMO_MODEL
from ctiqa.explanations import STREAK_VIEWS_BELOW
from ctiqa.simulation import expected_noise_hu


def features(model, processor, images, batch: int = 32) -> dict[str, np.ndarray]:
    """Mean-pooled vision-tower and projected features, float64 arrays (n, d)."""
    tower, proj = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            px = processor.image_processor([im[0] for im in images[i:i + batch]], return_tensors="pt")
            px = px["pixel_values"].to(model.dtype)
            hidden = model.model.vision_tower(pixel_values=px).last_hidden_state
            tower.append(hidden.mean(1).double().numpy())
            projected = model.model.multi_modal_projector(hidden)
            proj.append(projected.mean(1).double().numpy())
    return {"vision tower": np.concatenate(tower), "projected": np.concatenate(proj)}


def fit_predict(x_train, y_train, x_test, l2: float = 1e-2) -> np.ndarray:
    """Logistic regression (standardised inputs, L2 penalty, LBFGS); returns test logits."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    xt = torch.tensor((x_train - mu) / sd)
    yt = torch.tensor(y_train, dtype=torch.float64)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (torch.tensor((x_test - mu) / sd) @ w + b).detach().numpy()


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney U statistic."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--dataset", default=str(DEMO_DATASET))
    args = ap.parse_args()
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    ds = load_dataset(args.dataset)
    data = {}
    for split in ("train", "validation"):
        d = ds[split]
        y = np.array([int(v < STREAK_VIEWS_BELOW) for v in d["n_views"]])
        log_sigma = np.array([[math.log(expected_noise_hu(f, v))]
                              for f, v in zip(d["dose_fraction"], d["n_views"], strict=True)])
        data[split] = (features(model, processor, d["images"]), log_sigma, y)
    (f_tr, s_tr, y_tr), (f_va, s_va, y_va) = data["train"], data["validation"]
    print(f"model {args.model}; train {len(y_tr)} ({y_tr.sum()} with streaks), validation {len(y_va)} "
          f"({y_va.sum()} with streaks); streaks = n_views < {STREAK_VIEWS_BELOW}")
    print(f"validation AUC, log sigma only:             {auc(fit_predict(s_tr, y_tr, s_va), y_va):.3f}")
    for name in f_tr:
        logit_va = fit_predict(f_tr[name], y_tr, f_va[name])
        logit_tr = fit_predict(f_tr[name], y_tr, f_tr[name])
        b = auc(fit_predict(np.hstack([f_tr[name], s_tr]), y_tr, np.hstack([f_va[name], s_va])), y_va)
        coef = np.polyfit(s_tr[:, 0], logit_tr, 1)  # what log sigma explains of the logit, fitted on train
        resid = auc(logit_va - np.polyval(coef, s_va[:, 0]), y_va)
        print(f"validation AUC, {name:13s} features: {auc(logit_va, y_va):.3f}   + log sigma: {b:.3f}   "
              f"residual: {resid:.3f}   (dim {f_tr[name].shape[1]})")


if __name__ == "__main__":
    main()
