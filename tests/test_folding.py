"""One result per thing: folding on hand-made boxes, against a plain reference."""

from __future__ import annotations

import numpy as np

from index.folding import duplicate_share, fold, rank


def plain_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def reference_fold(ranked, threshold=0.7):
    """ranked: [(fragment id, artwork, box)] best first -> {kept id: [folded ids]}."""
    kept: dict = {}
    for fragment_id, artwork, box in ranked:
        into = next((k for k, (a, b, _) in kept.items()
                     if a == artwork and plain_iou(box, b) >= threshold), None)
        if into is None:
            kept[fragment_id] = (artwork, box, [])
        else:
            kept[into][2].append(fragment_id)
    return {k: also for k, (_, _, also) in kept.items()}


def folded(ids, artworks, boxes, scores, threshold=0.7):
    kept = fold(np.asarray(boxes, float), np.asarray(artworks), rank(scores, ids), threshold)
    return {ids[k.position]: [ids[i] for i in k.also] for k in kept}


BOX = [10, 10, 50, 50]
SHIFTED = [12, 12, 52, 52]  # IoU 0.82 with BOX
APART = [30, 30, 70, 70]  # IoU 0.14 with BOX


def test_overlapping_fragments_of_one_artwork_fold_into_the_best():
    # 7 overlaps 3 (better) on artwork 1; on artwork 2 the same box stays its own result.
    got = folded([3, 7, 9, 4], [1, 1, 2, 1], [BOX, SHIFTED, SHIFTED, APART], [0.9, 0.8, 0.7, 0.6])
    assert got == {3: [7], 9: [], 4: []}
    assert list(got) == [3, 9, 4]  # rank order kept


def test_the_fold_goes_to_the_best_score_not_the_lowest_id():
    assert folded([3, 7], [1, 1], [BOX, SHIFTED], [0.2, 0.8]) == {7: [3]}


def test_ties_go_to_the_lower_fragment_id_in_any_input_order():
    for ids in ([5, 2, 8], [8, 5, 2], [2, 8, 5]):
        boxes = {5: BOX, 2: SHIFTED, 8: BOX}
        got = folded(ids, [1, 1, 1], [boxes[i] for i in ids], [0.5, 0.5, 0.5])
        assert got == {2: [5, 8]}


def test_threshold_is_inclusive_and_a_chain_does_not_fold_through():
    # IoU exactly 0.5: folds at threshold 0.5, not above it.
    a, b = [0, 0, 30, 10], [10, 0, 40, 10]  # intersection 20x10, union 40x10 -> 0.5
    assert folded([1, 2], [1, 1], [a, b], [0.9, 0.8], threshold=0.5) == {1: [2]}
    assert folded([1, 2], [1, 1], [a, b], [0.9, 0.8], threshold=0.51) == {1: [], 2: []}
    # c overlaps b (folded into a) but not a: c is kept (greedy suppression by kept boxes).
    c = [20, 0, 50, 10]
    assert folded([1, 2, 3], [1, 1, 1], [a, b, c], [0.9, 0.8, 0.7], threshold=0.5) == {1: [2], 3: []}


def test_kept_fragments_never_overlap_and_match_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        xy = rng.uniform(0, 40, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(8, 20, (n, 2))], axis=1)
        artworks = rng.integers(0, 3, n)
        scores = rng.choice([0.1, 0.5, 0.9], n)  # many ties
        ids = rng.permutation(1000)[:n]
        got = folded(ids.tolist(), artworks, boxes, scores)
        order = sorted(range(n), key=lambda i: (-scores[i], ids[i]))
        expected = reference_fold([(int(ids[i]), int(artworks[i]), boxes[i].tolist()) for i in order])
        assert got == expected
        artwork_of = dict(zip(ids.tolist(), artworks.tolist(), strict=True))
        box_of = dict(zip(ids.tolist(), boxes.tolist(), strict=True))
        kept = list(got)
        for i, a in enumerate(kept):
            for b in kept[i + 1:]:
                assert artwork_of[a] != artwork_of[b] or plain_iou(box_of[a], box_of[b]) < 0.7


def test_duplicate_share_counts_what_folding_removes():
    boxes = np.asarray([BOX, SHIFTED, APART, BOX], float)
    artworks = np.asarray([1, 1, 1, 2])
    assert duplicate_share(boxes, artworks, np.arange(4)) == 0.25
    assert duplicate_share(boxes, artworks, np.asarray([2, 3])) == 0.0
    assert duplicate_share(boxes, artworks, np.asarray([], int)) == 0.0
