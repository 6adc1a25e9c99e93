"""How a frozen encoder is scored on the held-out images.

- **linear probe**: scikit-learn's ``LogisticRegression`` (C=1) on standardised
  features, fitted on the training images;
- **low-label linear probe**: the same probe fitted on only ``N`` labelled training
  images per class (``probe_labels_per_class``), averaged over ``probe_draws`` fixed
  draws of those images. With thousands of labels a linear probe recovers the class
  from almost any decent features (it saturates); with a few per class it scores how
  well the classes cluster, the standard low-label evaluation of self-supervised
  learning;
- **kNN**: lightly's ``knn_predict`` (cosine, k=20, t=0.1);
- **description structure** (what X-CLR is for): the Spearman correlation between how
  similar the held-out images' embeddings are and how similar their descriptions are.
  With class names (one description per class) it compares the class-mean image
  similarities with the class-name similarities, over all pairs of classes; with one
  caption per image it compares image pairs directly.

Nothing here is tuned: the settings are fixed before any run.
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
from xclr_plugin.demo.data import TaskData

__all__ = [
    "Scores",
    "evaluate_features",
    "features",
    "low_label_draws",
    "low_label_probe",
    "own_view_mass",
    "probe_noise",
    "score_features",
    "structure_rho",
]

Scores = dict[str, float]

#: Image pairs used for the caption-regime structure metric (a fixed subsample).
_MAX_PAIR_IMAGES = 400


@torch.no_grad()
def features(backbone: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    """Frozen features of preprocessed images, in eval mode, batched."""
    was_training = backbone.training
    backbone.eval()
    out = [backbone(chunk.to(device)).float().cpu() for chunk in images.split(512)]
    backbone.train(was_training)
    return torch.cat(out)


def _linear_probe(
    x: Tensor, labels: Tensor, fit_idx: Tensor, test_idx: Tensor, seed: int
) -> float:
    """Top-1 of a logistic regression (C=1, standardised) fitted on ``fit_idx``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=2000, random_state=seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(x[fit_idx].numpy(), labels[fit_idx].numpy())
    return float(
        (probe.predict(x[test_idx].numpy()) == labels[test_idx].numpy()).mean()
    )


def low_label_draws(
    labels: Tensor, train_idx: Tensor, per_class: int, draws: int, seed: int
) -> list[Tensor]:
    """``draws`` fixed subsets of ``train_idx`` with ``per_class`` images per class.

    A class with fewer training images gives all of them. Draw ``d`` depends only on
    ``seed`` (the split seed) and ``d``, never on the training seed or the method, so
    every encoder is probed with the same labelled images.
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
    """Linear probe fitted on ``probe_labels_per_class`` images per class.

    Returns:
        The mean top-1 on the test images over ``probe_draws`` fixed draws, and its
        standard error over the draws (how much the choice of labelled images moves
        the mean; the test-set noise comes on top).
    """
    x = feats.double()
    accs = [
        _linear_probe(x, data.labels, fit, data.test_idx, config.split_seed)
        for fit in low_label_draws(
            data.labels,
            data.train_idx,
            config.probe_labels_per_class,
            config.probe_draws,
            config.split_seed,
        )
    ]
    spread = (
        float(np.std(accs, ddof=1)) / math.sqrt(len(accs)) if len(accs) > 1 else 0.0
    )
    return float(np.mean(accs)), spread


def evaluate_features(
    feats: Tensor, data: TaskData, config: DemoConfig
) -> tuple[float, float]:
    """Linear probe and kNN top-1 on frozen features: fit on train, score on test."""
    from lightly.utils.benchmarking import knn_predict

    x = feats.double()
    x_train, x_test = x[data.train_idx], x[data.test_idx]
    y_train, y_test = data.labels[data.train_idx], data.labels[data.test_idx]
    linear = _linear_probe(
        x, data.labels, data.train_idx, data.test_idx, config.split_seed
    )
    bank = F.normalize(x_train.float(), dim=1)
    pred = knn_predict(
        F.normalize(x_test.float(), dim=1),
        bank.T.contiguous(),
        y_train,
        num_classes=data.num_classes,
        knn_k=min(config.knn_k, len(bank)),
        knn_t=config.knn_t,
    )[:, 0]
    return linear, float((pred == y_test).float().mean())


def _upper(matrix: Tensor) -> np.ndarray:
    """The entries above the diagonal, as a numpy vector."""
    i, j = torch.triu_indices(len(matrix), len(matrix), offset=1)
    return matrix[i, j].double().numpy()


def structure_rho(feats: Tensor, data: TaskData) -> float:
    """Spearman correlation of image and description similarities on held-out images.

    Class names: class-mean (normalised) image embeddings vs the class descriptions,
    over class pairs. One caption per image: image vs caption cosine similarity over
    the pairs of (a fixed subsample of) held-out images.
    """
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
    """Mean share of X-CLR's target on each view's own other view.

    X-CLR's target row for a view is a softmax over the batch's other ``2B - 1``
    views of the description similarities divided by ``tau_s``; SimCLR puts all of it
    on the other view of the same image. Averaged over random training batches.
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


def probe_noise(data: TaskData) -> float:
    """One standard error of an accuracy on the test images (worst case p = 0.5)."""
    return math.sqrt(0.25 / max(len(data.test_idx), 1))


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
        "probe_noise": probe_noise(data),
        "own_view_mass": own_view_mass(
            data, config.batch_size, config.target_temperature
        ),
    }
