"""Detection metrics on fake-probability scores (label 1 = fake): AUC, AP, EER, accuracy.

Computed in float64 from the sorted scores, with ties handled as the standard definitions do:
AUC is the Mann-Whitney statistic with mid-ranks (a tie counts one half), AP is the step sum
Σ (R_k - R_{k-1}) P_k over distinct thresholds (scikit-learn's definition), EER is where the
false-negative and false-positive rates cross on the ROC polyline."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from r2m_ext.errors import R2MError

ACCURACY_THRESHOLD = 0.5


@dataclass(frozen=True)
class DetectionMetrics:
    auc: float
    ap: float
    eer: float
    accuracy: float
    real: int
    fake: int

    def to_dict(self) -> dict:
        return asdict(self)


def _checked(labels, scores, subset: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise R2MError(f"{subset}: {labels.size} labels but {scores.size} scores")
    if not np.isin(labels, (0, 1)).all():
        raise R2MError(f"{subset}: labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(scores).all():
        raise R2MError(f"{subset}: the detector produced NaN or infinite scores")
    if labels.min(initial=1) == 1 or labels.max(initial=0) == 0:
        raise R2MError(f"{subset}: AUC needs both real and fake images, got only one class")
    return labels, scores


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_tie]
    false_positives = (last_of_tie + 1) - true_positives
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    return fpr, tpr


def auc_score(labels, scores, subset: str = "data") -> float:
    labels, scores = _checked(labels, scores, subset)
    ranks = _midranks(scores)
    positives = labels.sum()
    negatives = labels.size - positives
    return float(
        (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def _midranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def average_precision(labels, scores, subset: str = "data") -> float:
    labels, scores = _checked(labels, scores, subset)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def equal_error_rate(labels, scores, subset: str = "data") -> float:
    labels, scores = _checked(labels, scores, subset)
    fpr, tpr = _roc(labels, scores)
    fnr = 1.0 - tpr
    # fnr - fpr falls from 1 to -1 along the ROC polyline; the EER is where it crosses zero.
    gap = fnr - fpr
    crossing = int(np.flatnonzero(gap <= 0)[0])
    if gap[crossing] == 0:
        return float(fpr[crossing])
    before, after = gap[crossing - 1], gap[crossing]
    weight = before / (before - after)
    return float(fpr[crossing - 1] + weight * (fpr[crossing] - fpr[crossing - 1]))


def accuracy(labels, scores, subset: str = "data") -> float:
    labels, scores = _checked(labels, scores, subset)
    return float(np.mean((scores >= ACCURACY_THRESHOLD) == (labels == 1)))


def detection_metrics(labels, scores, subset: str = "data") -> DetectionMetrics:
    labels_array = np.asarray(labels).ravel()
    return DetectionMetrics(
        auc=auc_score(labels, scores, subset),
        ap=average_precision(labels, scores, subset),
        eer=equal_error_rate(labels, scores, subset),
        accuracy=accuracy(labels, scores, subset),
        real=int((labels_array == 0).sum()),
        fake=int((labels_array == 1).sum()),
    )
