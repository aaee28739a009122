"""Recall metrics against plain references on hand-made score matrices, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics


def reference_rank(scores: list[float], relevant: list[bool]) -> float:
    """Sort the candidates best first, negatives before positives on a tie (pessimistic), and
    return the position of the first positive (inf when no positive was returned: -inf)."""
    if not any(relevant) or max(s for s, r in zip(scores, relevant, strict=True) if r) == -math.inf:
        return math.inf  # nothing relevant, or nothing relevant returned
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], relevant[j]))
    return float(next(position for position, j in enumerate(order) if relevant[j]))


def scan_protocol_reference(sims: np.ndarray, captions_per_image: int) -> tuple[list, list]:
    """SCAN's own i2t/t2i loops (Lee et al. 2018, evaluation.py), written plainly: captions
    5i..5i+4 belong to image i; ranks are 0-based."""
    n_img = sims.shape[0]
    i2t, t2i = [], []
    for i in range(n_img):
        order = list(np.argsort(sims[i])[::-1])
        i2t.append(min(order.index(j) for j in range(captions_per_image * i,
                                                       captions_per_image * (i + 1))))
    for j in range(sims.shape[1]):
        order = list(np.argsort(sims[:, j])[::-1])
        t2i.append(order.index(j // captions_per_image))
    return i2t, t2i


def test_ties_count_against_the_model():
    scores = np.array([
        [0.5, 0.5, 0.1, 0.9],   # positive ties a negative and loses to 0.9: rank 2
        [0.5, 0.5, 0.1, 0.2],   # two positives tie each other: rank 0
        [0.3, 0.3, 0.3, 0.3],   # constant scorer: every negative ties, rank 3
        [0.1, 0.2, 0.3, 0.4],   # no positive at all: inf
        [-np.inf, 0.2, -np.inf, 0.4],  # the positive was not returned: inf, not rank 3
        [-np.inf, 0.2, 0.3, -np.inf],  # a returned positive beats the rest: rank 0
    ])
    relevant = np.array([
        [False, True, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, False],
        [True, False, False, False],
        [True, False, True, False],
    ])
    assert metrics.ranks(scores, relevant).tolist() == [2.0, 0.0, 3.0, math.inf, math.inf, 0.0]


def test_ranks_equal_reference_on_integer_scores_with_many_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(60, 23)).astype(np.float32)  # small range: ties everywhere
    relevant = rng.random((60, 23)) < 0.15
    scores[5, :] = -np.inf  # a first stage that returned nothing
    relevant[5, 3] = True
    scores[6, ::2] = -np.inf  # ... or only some candidates
    got = metrics.ranks(scores, relevant, chunk=7)  # chunk smaller than n_query on purpose
    want = [reference_rank(list(s), list(r)) for s, r in zip(scores, relevant, strict=True)]
    assert got.tolist() == want


def test_recall_and_median_rank_equal_plain_counts():
    query_ranks = np.array([0, 0, 3, 4, 9, 10, 57, math.inf])
    assert metrics.recall(query_ranks, 1) == pytest.approx(100 * 2 / 8)
    assert metrics.recall(query_ranks, 5) == pytest.approx(100 * 4 / 8)
    assert metrics.recall(query_ranks, 10) == pytest.approx(100 * 5 / 8)
    assert metrics.median_rank(query_ranks) == math.floor(np.median(query_ranks)) + 1 == 7
    assert metrics.median_rank(np.array([0, math.inf, math.inf])) == math.inf


def test_scan_protocol_with_five_captions_per_image():
    rng = np.random.default_rng(1)
    sims = rng.normal(size=(12, 60))  # continuous scores: no ties, SCAN's argsort is exact
    relevant = np.zeros_like(sims, dtype=bool)
    for i in range(12):
        relevant[i, 5 * i:5 * i + 5] = True
    i2t_ref, t2i_ref = scan_protocol_reference(sims, 5)
    result = metrics.bidirectional(sims, relevant)
    assert metrics.ranks(sims, relevant).tolist() == i2t_ref
    assert metrics.ranks(sims.T, relevant.T).tolist() == t2i_ref
    for direction, reference in (("i2t", i2t_ref), ("t2i", t2i_ref)):
        for k in (1, 5, 10):
            want = 100 * sum(r < k for r in reference) / len(reference)
            assert result[direction][f"r{k}"] == pytest.approx(want)
        assert result[direction]["medr"] == math.floor(np.median(reference)) + 1
    assert result["rsum"] == pytest.approx(sum(result[d][f"r{k}"]
                                               for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_a_perfect_scorer_gets_rsum_600():
    relevant = np.kron(np.eye(4, dtype=bool), np.ones((1, 3), dtype=bool))  # 4 images, 3 captions
    result = metrics.bidirectional(relevant.astype(float), relevant)
    assert result["rsum"] == 600.0
    assert result["i2t"]["medr"] == result["t2i"]["medr"] == 1.0


def test_iou_hits_on_hand_made_boxes():
    targets = np.array([[0, 0, 10, 10], [50, 50, 70, 90]], dtype=float)
    target_groups = np.array([0, 1])
    candidates = np.array([
        [0, 0, 10, 10],    # identical, same artwork: hit
        [0, 0, 10, 20],    # IoU 0.5 exactly: hit (>=)
        [0, 0, 10, 21],    # IoU 100/210 < 0.5: miss
        [0, 0, 10, 10],    # identical box but on another artwork: miss
        [52, 55, 70, 90],  # IoU 630/800 with the second target: hit
        [100, 100, 120, 120],
    ], dtype=float)
    candidate_groups = np.array([0, 0, 0, 1, 1, 1])
    hits = metrics.iou_relevance(candidates, candidate_groups, targets, target_groups)
    assert hits.tolist() == [True, True, False, False, True, False]
    assert not metrics.iou_relevance(candidates, candidate_groups, np.zeros((0, 4)),
                                     np.zeros(0)).any()
