"""How a frozen encoder is scored on the held-out images; nothing here is tuned.

- **linear**: scikit-learn's ``LogisticRegression`` (C=1) on standardised features;
- **low-label**: the same on ``probe_labels_per_class`` labelled training images per
  class, averaged over ``probe_draws`` fixed draws (with thousands of labels a linear
  probe saturates; with a few per class it scores how well the classes cluster);
- **kNN**: lightly's ``knn_predict`` (cosine);
- **rho** (what X-CLR is for): the Spearman correlation between image-embedding and
  description similarities; class means against class names when many images share
  a description, image pairs when each has its own caption.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xclr_plugin.demo.config import DemoConfig
from xclr_plugin.demo.data import TaskData, normalize, unit

Scores = dict[str, float]

#: Image pairs used for the caption-regime structure metric (a fixed subsample).
_MAX_PAIR_IMAGES = 400


@torch.no_grad()
def features(backbone: nn.Module, pixels: Tensor, device: torch.device) -> Tensor:
    """Frozen features of ``uint8`` images (normalised as in training), batched."""
    backbone.eval()
    return torch.cat(
        [
            backbone(normalize(unit(x.to(device)))).float().cpu()
            for x in pixels.split(512)
        ]
    )


def _linear_probe(
    x: Tensor, labels: Tensor, fit_idx: Tensor, test_idx: Tensor, seed: int
) -> float:
    """Top-1 of a logistic regression (C=1, standardised) fitted on ``fit_idx``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x[fit_idx].numpy(), labels[fit_idx].numpy())
    pred = probe.predict(x[test_idx].numpy())
    return float((pred == labels[test_idx].numpy()).mean())


def low_label_draws(
    labels: Tensor, train_idx: Tensor, per_class: int, draws: int, seed: int
) -> list[Tensor]:
    """``draws`` fixed subsets of ``train_idx``, ``per_class`` images per class (or all).

    Draw ``d`` depends only on ``seed`` (the split seed) and ``d``, so every encoder
    is probed with the same labelled images.
    """
    y = labels[train_idx]
    out = []
    for d in range(draws):
        g = torch.Generator().manual_seed(10_000 * seed + d)
        picks = []
        for k in torch.unique(y).tolist():
            members = train_idx[y == k]
            picks.append(members[torch.randperm(len(members), generator=g)[:per_class]])
        out.append(torch.cat(picks).sort().values)
    return out


def low_label_probe(
    feats: Tensor, data: TaskData, config: DemoConfig
) -> tuple[float, float]:
    """Mean top-1 of the low-label probe over the draws, and its standard error over
    the draws (the test-set noise comes on top)."""
    x, seed = feats.double(), config.split_seed
    draws = low_label_draws(data.labels, data.train_idx, config.probe_labels_per_class,
                            config.probe_draws, seed)  # fmt: skip
    accs = [_linear_probe(x, data.labels, fit, data.test_idx, seed) for fit in draws]
    spread = float(np.std(accs, ddof=1)) / math.sqrt(len(accs)) if len(accs) > 1 else 0.0  # fmt: skip
    return float(np.mean(accs)), spread


def evaluate_features(
    feats: Tensor, data: TaskData, config: DemoConfig
) -> tuple[float, float]:
    """Linear probe and kNN top-1 on frozen features: fit on train, score on test."""
    from lightly.utils.benchmarking import knn_predict

    x, train, test = feats.double(), data.train_idx, data.test_idx
    linear = _linear_probe(x, data.labels, train, test, config.split_seed)
    bank = F.normalize(x[train].float(), dim=1)
    pred = knn_predict(
        F.normalize(x[test].float(), dim=1), bank.T.contiguous(), data.labels[train],
        num_classes=data.num_classes, knn_k=min(config.knn_k, len(bank)),
        knn_t=config.knn_t,
    )[:, 0]  # fmt: skip
    return linear, float((pred == data.labels[test]).float().mean())


def _upper(matrix: Tensor) -> np.ndarray:
    """The entries above the diagonal, as a numpy vector."""
    i, j = torch.triu_indices(len(matrix), len(matrix), offset=1)
    return matrix[i, j].double().numpy()


def structure_rho(feats: Tensor, data: TaskData) -> float:
    """Spearman correlation of image and description similarities on held-out images:
    over class pairs of class means (class names), or over pairs of a fixed subsample
    of images (one caption per image)."""
    from scipy.stats import spearmanr

    idx = data.test_idx
    x = F.normalize(feats[idx].float(), dim=1)
    c = data.caption_embeddings[idx].float()
    y = data.labels[idx]
    if data.regime == "class names":
        onehot = F.one_hot(y, data.num_classes).float()
        x = F.normalize(onehot.T @ x, dim=1)
        c = F.normalize(onehot.T @ c, dim=1)
    elif len(idx) > _MAX_PAIR_IMAGES:
        keep = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))
        x, c = x[keep[:_MAX_PAIR_IMAGES]], c[keep[:_MAX_PAIR_IMAGES]]
    rho = spearmanr(_upper(x @ x.T), _upper(c @ c.T)).statistic
    return float(rho) if math.isfinite(rho) else 0.0


def score_features(feats: Tensor, data: TaskData, config: DemoConfig) -> Scores:
    """All scores of one encoder: linear, low-label linear, kNN, structure."""
    linear, knn = evaluate_features(feats, data, config)
    low, low_se = low_label_probe(feats, data, config)
    return {
        "linear_top1": linear,
        "lowlabel_top1": low,
        "lowlabel_draw_se": low_se,
        "knn_top1": knn,
        "structure_rho": structure_rho(feats, data),
    }


def own_view_mass(
    data: TaskData, batch_size: int, tau_s: float, *, batches: int = 20
) -> float:
    """Mean share of X-CLR's target on each view's own other view (SimCLR's: all).

    The target row of a view is a softmax of the description similarities to the
    batch's other ``2B - 1`` views over ``tau_s``; averaged over random batches.
    """
    c = data.caption_embeddings[data.train_idx].float()
    b = min(batch_size, len(c))
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(batches):
        rows = c[torch.randperm(len(c), generator=g)[:b]]
        s = (rows @ rows.T).fill_diagonal_(1.0).repeat(2, 2).fill_diagonal_(-math.inf)
        target = torch.softmax(s / tau_s, dim=1)
        total += float(torch.diagonal(target, b).mean())
    return total / batches


def references(
    data: TaskData, config: DemoConfig, random_init: Tensor
) -> dict[str, Any]:
    """Rows every table needs: random init, chance and the descriptions alone."""
    train_labels = data.labels[data.train_idx]
    majority = int(torch.bincount(train_labels, minlength=data.num_classes).argmax())
    rate = float((data.labels[data.test_idx] == majority).float().mean())
    text_linear, text_knn = evaluate_features(data.caption_embeddings, data, config)
    return {
        "random_init": score_features(random_init, data, config),
        "majority_class": {"class": data.class_names[majority], "top1": rate},
        "uniform_chance": 1.0 / data.num_classes,
        "descriptions_alone": {"linear_top1": text_linear, "knn_top1": text_knn},
        # one standard error of an accuracy on the test images (worst case p = 0.5)
        "probe_noise": math.sqrt(0.25 / max(len(data.test_idx), 1)),
        "own_view_mass": own_view_mass(
            data, config.batch_size, config.target_temperature
        ),
    }
