"""Multi-label metrics against hand-computed values and brute-force references (no sklearn)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from coopkit.multilabel_metrics import (average_precision, choose_thresholds, f1_at, mean_average_precision,
                                        multilabel_report)


def brute_ap(scores, targets) -> float:
    """AP by its definition: mean over the known positives of the precision at their score
    (every image scoring at least as high counted), in plain Python."""
    known = [(s, y) for s, y in zip(scores, targets) if y != -1]
    pos = [s for s, y in known if y == 1]
    if not pos:
        return float("nan")
    total = 0.0
    for sp in pos:
        above = [y for s, y in known if s >= sp]
        total += sum(1 for y in above if y == 1) / len(above)
    return total / len(pos)


def brute_counts(scores, targets, th):
    tp = fp = fn = 0
    for s, y in zip(scores, targets):
        if y == -1:
            continue
        tp += s > th and y == 1
        fp += s > th and y == 0
        fn += s <= th and y == 1
    return tp, fp, fn


def test_ap_hand_values():
    # ranks 1..4: +, -, +, -  -> (1/1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])[0] == pytest.approx((1 + 2 / 3) / 2)
    # unknown images are left out of the ranking: the -1 at 0.85 would otherwise cost precision
    assert average_precision([0.9, 0.85, 0.8, 0.7], [0, -1, 1, 1])[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # a tie between a positive and a negative at the top: precision 1/2 there, whatever their order
    assert average_precision([0.5, 0.5, 0.1], [1, 0, 1])[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision([0.5, 0.5, 0.1], [0, 1, 1])[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert np.isnan(average_precision([0.3, 0.2], [0, -1])[0])


def test_ap_equals_brute_force_on_random_cases_with_ties_and_unknowns():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, c = int(rng.integers(2, 15)), int(rng.integers(1, 4))
        scores = rng.integers(0, 6, (n, c)) / 5.0 if trial % 2 else rng.random((n, c))  # ties on odd trials
        targets = rng.choice([-1, 0, 1], size=(n, c), p=[0.2, 0.5, 0.3])
        ours = average_precision(scores, targets)
        ref = [brute_ap(scores[:, k].tolist(), targets[:, k].tolist()) for k in range(c)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12, equal_nan=True)


def test_ap_equals_the_official_average_precision_without_ties():
    from reference.dualcoop_official import average_precision as official_ap, mAP as official_map

    rng = np.random.default_rng(1)
    scores, targets = rng.random((50, 6)), (rng.random((50, 6)) < 0.3).astype(int)
    targets[0] = 1  # every class has a positive
    np.testing.assert_allclose(average_precision(scores, targets),
                               [official_ap(scores[:, k], targets[:, k]) for k in range(6)], rtol=1e-6)
    assert 100 * mean_average_precision(scores, targets) == pytest.approx(official_map(targets, scores), rel=1e-6)


def test_map_skips_classes_without_positive():
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert mean_average_precision(scores, [[1, 0], [0, 0]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mAP is undefined"):
        mean_average_precision(scores, [[0, 0], [0, -1]])


def test_f1_against_brute_force_counts():
    rng = np.random.default_rng(2)
    scores = rng.random((40, 5))
    targets = rng.choice([-1, 0, 1], size=(40, 5), p=[0.1, 0.6, 0.3])
    th = np.array([0.2, 0.4, 0.5, 0.6, 0.95])
    out = f1_at(scores, targets, th)
    tps, fps, fns, f1s = [], [], [], []
    for k in range(5):
        tp, fp, fn = brute_counts(scores[:, k], targets[:, k], th[k])
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        assert out["per_class"]["precision"][k] == pytest.approx(p)
        assert out["per_class"]["recall"][k] == pytest.approx(r)
        tps.append(tp), fps.append(fp), fns.append(fn)
    assert out["CF1"] == pytest.approx(sum(f1s) / 5)
    op, orr = sum(tps) / (sum(tps) + sum(fps)), sum(tps) / (sum(tps) + sum(fns))
    assert out["OP"] == pytest.approx(op) and out["OR"] == pytest.approx(orr)
    assert out["OF1"] == pytest.approx(2 * op * orr / (op + orr))
    assert out["per_class"]["support"] == (targets == 1).sum(0).tolist()
    # one threshold for all classes is the same as repeating it
    assert f1_at(scores, targets, 0.5) == f1_at(scores, targets, np.full(5, 0.5))
    with pytest.raises(ValueError, match="one per class"):
        f1_at(scores, targets, [0.5, 0.5])


def test_chosen_thresholds_reach_the_best_f1_of_every_cut():
    rng = np.random.default_rng(3)
    for trial in range(50):
        n = int(rng.integers(3, 12))
        scores = rng.integers(0, 8, (n, 3)) / 7.0 if trial % 2 else rng.random((n, 3))
        targets = rng.choice([-1, 0, 1], size=(n, 3), p=[0.15, 0.5, 0.35])
        th = choose_thresholds(scores, targets)
        for k in range(3):
            col, y = scores[:, k].tolist(), targets[:, k].tolist()
            if 1 not in y:
                assert th[k] == 0.5
                continue
            # every possible split: thresholds just below each score, and above the highest
            cands = [s - 1e-9 for s in col] + [max(col) + 1]
            best = max(2 * tp / (2 * tp + fp + fn) for tp, fp, fn in (brute_counts(col, y, t) for t in cands))
            tp, fp, fn = brute_counts(col, y, th[k])
            assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(best)


def test_threshold_lies_between_scores():
    th = choose_thresholds([[0.9], [0.7], [0.4], [0.1]], [[1], [1], [0], [0]])
    assert th[0] == pytest.approx(0.55)


def test_report_and_bad_input():
    out = multilabel_report([[0.9, 0.2], [0.1, 0.3]], [[1, 0], [0, 0]])
    assert out["mAP"] == 1.0 and out["AP"] == [1.0, None] and out["OF1"] == 1.0
    with pytest.raises(ValueError, match="same"):
        average_precision(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"target values \[2\]"):
        average_precision(np.zeros((1, 1)), [[2]])
    for combo in itertools.product([np.nan, np.inf], repeat=1):
        with pytest.raises(ValueError, match="NaN"):
            average_precision([[combo[0]]], [[1]])
