"""Detection metrics against hand-computed values and brute-force definitions."""

import itertools

import numpy as np
import pytest

from r2m_ext.detect.metrics import (
    accuracy,
    auc_score,
    average_precision,
    detection_metrics,
    equal_error_rate,
)
from r2m_ext.errors import R2MError

# (labels, scores, AUC, AP, EER, accuracy), derived by hand in the comments.
HAND_CASES = [
    # Pairs (fake, real): 0.35>0.1, 0.35<0.4, 0.8>both: 3/4. Thresholds 0.8 (P=1, R=.5),
    # 0.4 (P=.5), 0.35 (P=2/3, R=1): AP = .5*1 + .5*2/3. ROC (fpr, fnr): (0,.5),(.5,.5): EER .5.
    # At 0.5 only 0.35 (fake) is on the wrong side: accuracy 3/4.
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75, 5 / 6, 0.5, 0.75),
    # Tie 0.5/0.5 counts one half: (0.5 + 1 + 1 + 1) / 4. Thresholds 0.9 (P=1, R=.5),
    # 0.5 (P=2/3, R=1). ROC (fpr, fnr): (0,.5), (.5,0): fnr-fpr crosses 0 halfway: EER 0.25.
    ([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 0.875, 5 / 6, 0.25, 0.75),
    # Perfectly separated, then perfectly inverted.
    ([0, 0, 1], [0.1, 0.2, 0.7], 1.0, 1.0, 0.0, 1.0),
    ([0, 1], [0.9, 0.1], 0.0, 0.5, 1.0, 0.0),
    # All scores tied: AUC one half, AP = the fake fraction, the ROC is the diagonal.
    ([0, 1, 1, 0, 1], [0.3] * 5, 0.5, 0.6, 0.5, 0.4),
]


@pytest.mark.parametrize("labels, scores, auc, ap, eer, acc", HAND_CASES)
def test_hand_computed(labels, scores, auc, ap, eer, acc):
    assert auc_score(labels, scores) == pytest.approx(auc, abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(ap, abs=1e-12)
    assert equal_error_rate(labels, scores) == pytest.approx(eer, abs=1e-12)
    assert accuracy(labels, scores) == pytest.approx(acc, abs=1e-12)


def _brute_auc(labels, scores):
    fakes = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    reals = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((f > r) + 0.5 * (f == r) for f, r in itertools.product(fakes, reals))
    return wins / (len(fakes) * len(reals))


def _brute_ap(labels, scores):
    labels, scores = np.asarray(labels), np.asarray(scores)
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        flagged = scores >= threshold
        precision = labels[flagged].mean()
        recall = labels[flagged].sum() / labels.sum()
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def _brute_eer_bounds(labels, scores):
    """At the EER, fpr = fnr; it lies between the best max(fpr, fnr) over thresholds and the
    min(fpr, fnr) at that threshold (the ROC is linear in between)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    best = None
    for threshold in [*sorted(set(scores)), np.inf]:
        flagged = scores >= threshold
        fpr = flagged[labels == 0].mean()
        fnr = 1 - flagged[labels == 1].mean()
        if best is None or max(fpr, fnr) < max(best):
            best = (fpr, fnr)
    return min(best), max(best)


@pytest.mark.parametrize("seed", range(6))
def test_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    # Coarse scores so that ties between real and fake are common.
    scores = np.round(rng.random(60) * 0.5 + 0.3 * labels, 1)
    assert auc_score(labels, scores) == pytest.approx(_brute_auc(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(_brute_ap(labels, scores), abs=1e-12)
    low, high = _brute_eer_bounds(labels, scores)
    assert low - 1e-12 <= equal_error_rate(labels, scores) <= high + 1e-12


def test_all_metrics_and_counts():
    metrics = detection_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert (metrics.real, metrics.fake) == (2, 2)
    assert metrics.to_dict()["auc"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([1, 1], [0.2, 0.3], "only one class"),
        ([0, 1], [0.2, float("nan")], "NaN"),
        ([0, 2], [0.2, 0.3], "labels must be"),
        ([0, 1, 1], [0.2, 0.3], "3 labels but 2 scores"),
    ],
)
def test_bad_input(labels, scores, message):
    with pytest.raises(R2MError, match=message):
        detection_metrics(labels, scores, "subset")
