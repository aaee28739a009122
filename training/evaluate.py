"""Evaluation of a SCAN checkpoint on one split of a collection.

Every task is scored three ways, so the two-stage index can be judged against what it
approximates:

- ``scan``: exhaustive stacked cross attention over every candidate;
- ``two_stage``: the service's path, pooled-vector cosine picks ``k_candidates`` per query
  (exact top-K, what a flat FAISS index returns), then SCAN reranks them; a candidate the
  first stage did not return scores ``-inf``, so it can only rank after every returned one.
  A pair's SCAN score does not depend on the other candidates, so masking the exhaustive
  matrix gives exactly the reranked order;
- ``pooled``: the first stage alone (rank by pooled cosine), the baseline.

Coarse grain: image annotation (image -> its captions) and image retrieval (caption ->
image), SCAN's protocol. Fine grain:

- crop -> phrase: each annotation box's fragment ranks every distinct phrase of the split;
  relevant are the phrases annotated on that artwork with a box of IoU >= 0.5 to it;
- phrase -> fragment: each annotated (artwork, phrase) ranks every whole-image and extracted
  fragment of the split; relevant is a fragment with IoU >= 0.5 to a box of that phrase on
  its own artwork (the same thing found on another artwork that has it annotated counts too);
  ``oracle`` is the share of queries that any fragment can answer at all;
- grounding: the same, among the fragments of the query's own artwork only (R@1).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from collection.layout import Collection
from index import folding
from models.encoder import Encoder
from models.scan import load_scan, pooled
from training import metrics
from training.data import AlignmentData, alignment_data, open_store, split_fragments

if TYPE_CHECKING:
    from index.featurestore import FeatureStore

log = logging.getLogger(__name__)

K_CANDIDATES = 100
SCORERS = ("scan", "two_stage", "pooled")


@dataclass
class Scores:
    """(n_fragment, n_text) scores of one candidate set, both ways."""

    scan: torch.Tensor  # cross-attention similarity
    pooled: torch.Tensor  # cosine of the pooled first-stage vectors


@torch.no_grad()
def score(encoder: Encoder, data: AlignmentData, *, chunk: int = 256, progress: bool | None = None) -> Scores:
    """SCAN and pooled scores of every fragment of ``data`` against every text of ``data``.

    Texts are encoded once; fragments in chunks of ``chunk``, sorted by region count so that
    a chunk pads little.
    """
    model = encoder.model
    model.eval()
    texts, word_lens = encoder.read(data.text_inputs)  # (n_txt, w, d)
    text_pooled = pooled(texts, word_lens)  # (n_txt, d)
    n = len(data.fragment_rows)
    scan = torch.empty(n, len(data.texts))
    cosine = torch.empty(n, len(data.texts))
    order = np.argsort([len(rows) for rows in data.fragment_rows], kind="stable")
    progress = sys.stderr.isatty() if progress is None else progress  # no bars in a log file
    for start in tqdm(range(0, n, chunk), desc="scoring fragments", unit="chunk",
                      disable=not progress, leave=False):
        members = order[start:start + chunk]
        images, lens = encoder.stored(data.store, [data.fragment_rows[i] for i in members])  # (c, r, d)
        scan[members] = model.similarity(images, lens, texts, word_lens).float().cpu()
        cosine[members] = (pooled(images, lens) @ text_pooled.T).float().cpu()  # (c, n_txt)
    return Scores(scan, cosine)


def two_stage(scores: Scores, k: int, *, queries_are_rows: bool) -> torch.Tensor:
    """SCAN scores where the pooled first stage returned the candidate (top ``k`` per query),
    ``-inf`` elsewhere."""
    pooled = scores.pooled if queries_are_rows else scores.pooled.T  # (n_query, n_candidate)
    scan = scores.scan if queries_are_rows else scores.scan.T
    k = min(k, pooled.shape[1])
    keep = torch.zeros_like(pooled, dtype=torch.bool)
    keep.scatter_(1, pooled.topk(k, dim=1).indices, True)
    masked = scan.masked_fill(~keep, float("-inf"))
    return masked if queries_are_rows else masked.T


def task(scores: Scores, relevant: np.ndarray, *, queries_are_rows: bool, k: int,
         query_rows: np.ndarray | None = None) -> dict:
    """R@K and median rank of one direction under the three scorers, and the share of
    exhaustive SCAN's R@K that the two-stage path keeps.

    ``query_rows`` repeats or selects queries (rows after orienting queries first), for
    query units such as (artwork, phrase) that share one text.
    """
    matrices = {"scan": scores.scan, "two_stage": two_stage(scores, k, queries_are_rows=
                                                            queries_are_rows),
                "pooled": scores.pooled}
    relevant_q = relevant if queries_are_rows else relevant.T
    result: dict = {}
    for name, matrix in matrices.items():
        matrix_q = matrix if queries_are_rows else matrix.T  # (n_query, n_candidate)
        query_ranks = metrics.ranks(matrix_q, relevant_q)
        if query_rows is not None:
            query_ranks = query_ranks[query_rows]
        result[name] = metrics.summarize(query_ranks)
    result["kept"] = {f"r{k_}": (result["two_stage"][f"r{k_}"] / result["scan"][f"r{k_}"]
                                 if result["scan"][f"r{k_}"] > 0 else None)
                      for k_ in metrics.KS}
    return result


def evaluate_coarse(encoder: Encoder, collection: Collection, store: FeatureStore, *,
                    split: str, k: int) -> dict:
    data = alignment_data(collection, store, encoder.reader, grain="coarse", split=split)
    scores = score(encoder, data)
    relevant = data.relevance()  # (n_artwork, n_caption)
    annotation = task(scores, relevant, queries_are_rows=True, k=k)
    retrieval = task(scores, relevant, queries_are_rows=False, k=k)
    return {
        "image_annotation": annotation,
        "image_retrieval": retrieval,
        "rsum": {name: metrics.rsum(annotation[name], retrieval[name]) for name in SCORERS},
        "counts": {"images": len(data.fragment_rows), "captions": len(data.texts)},
    }


def phrase_boxes(artworks: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """phrase -> (its annotated boxes (g, 4), their artworks' numbers in ``artworks`` (g,))."""
    boxes: dict[str, list] = {}
    for number, artwork in enumerate(artworks):
        for annotation in artwork.annotations:
            boxes.setdefault(annotation.phrase, []).append((annotation.box, number))
    return {p: (np.asarray([b for b, _ in v], dtype=np.float64),
                np.asarray([n for _, n in v], dtype=np.int64)) for p, v in boxes.items()}


def phrase_relevance(fragments: AlignmentData, phrases: list[str], boxes_of: dict) -> np.ndarray:
    """(n_fragment, n_phrase) bool: the fragment overlaps (IoU >= 0.5, same artwork) a box
    annotated with the phrase. ``boxes_of[phrase]`` = (boxes (g, 4), artwork numbers (g,))."""
    relevant = np.zeros((len(fragments.fragment_rows), len(phrases)), dtype=bool)
    for column, phrase in enumerate(phrases):
        target_boxes, target_artworks = boxes_of.get(phrase, (np.zeros((0, 4)), np.zeros(0)))
        relevant[:, column] = metrics.iou_relevance(
            fragments.fragment_boxes, fragments.fragment_artworks, target_boxes, target_artworks)
    return relevant


def evaluate_fine(encoder: Encoder, collection: Collection, store: FeatureStore, *,
                  split: str, k: int) -> dict:
    artworks = collection.split(split)
    annotated = [a for a in artworks if a.annotations]
    if not annotated:
        raise ValueError(f"{collection.root}: split {split!r} has no annotated artworks; fine-"
                         "grained evaluation needs ground-truth boxes (try --grain coarse)")
    number_of = {a.id: i for i, a in enumerate(artworks)}
    boxes_of = phrase_boxes(artworks)
    all_phrases = list(dict.fromkeys([p for a in artworks for p in a.phrases] + list(boxes_of)))

    # crop -> phrase: annotation fragments against every phrase of the split. alignment_data
    # and split_fragments number artworks in split order, as number_of does.
    crops = _with_texts(alignment_data(collection, store, encoder.reader, grain="fine",
                                       split=split, supervision="boxes"), all_phrases, encoder)
    crop_scores = score(encoder, crops)
    crop_relevant = phrase_relevance(crops, crops.texts, boxes_of)
    crop_to_phrase = task(crop_scores, crop_relevant, queries_are_rows=True, k=k)

    # phrase -> fragment: one query per annotated (artwork, phrase); a phrase's text is scored
    # once and its column is repeated for every artwork that has it annotated.
    queries = list(dict.fromkeys((number_of[a.id], n.phrase) for a in annotated
                                 for n in a.annotations))
    query_phrases = list(dict.fromkeys(phrase for _, phrase in queries))
    candidates = split_fragments(collection, store, encoder.reader, split=split,
                                 texts=query_phrases)
    column_of = {text: i for i, text in enumerate(candidates.texts)}
    queries = [(number, phrase) for number, phrase in queries if phrase in column_of]
    columns = np.asarray([column_of[phrase] for _, phrase in queries], dtype=np.int64)
    fragment_scores = score(encoder, candidates)
    fragment_relevant = phrase_relevance(candidates, candidates.texts, boxes_of)
    phrase_to_fragment = task(fragment_scores, fragment_relevant, queries_are_rows=False, k=k,
                              query_rows=columns)
    phrase_to_fragment["oracle"] = float(100 * fragment_relevant[:, columns].any(axis=0).mean())
    phrase_to_fragment["folding"] = {
        "detected": folding_effect(fragment_scores, fragment_relevant, candidates, columns, k=k),
        "served": _served_folding(encoder, collection, store, split=split, k=k, boxes_of=boxes_of,
                                  query_phrases=[phrase for _, phrase in queries]),
    }
    grounding = _grounding(fragment_scores, candidates, queries, columns, boxes_of)
    return {
        "crop_to_phrase": crop_to_phrase,
        "phrase_to_fragment": phrase_to_fragment,
        "grounding": grounding,
        "rsum": {name: metrics.rsum(crop_to_phrase[name], phrase_to_fragment[name])
                 for name in SCORERS},
        "counts": {"annotation_crops": len(crops.fragment_rows), "phrases": len(crops.texts),
                   "phrase_queries": len(queries), "fragments": len(candidates.fragment_rows)},
    }


def folding_effect(scores: Scores, relevant: np.ndarray, candidates: AlignmentData,
                   columns: np.ndarray, *, k: int, top: int = 10) -> dict:
    """Phrase -> fragment before and after folding (:mod:`index.folding`), for exhaustive
    SCAN and the two-stage path: the share of top-``top`` results that overlap a higher-ranked
    fragment of the same artwork (IoU >= 0.7), and R@1/5/10 of the folded ranking."""
    matrices = {"scan": scores.scan, "two_stage": two_stage(scores, k, queries_are_rows=True)}
    boxes, artworks = candidates.fragment_boxes, candidates.fragment_artworks
    result = {}
    for name, matrix in matrices.items():
        matrix_q = matrix.T[columns].numpy()  # (n_query, n_fragment)
        relevant_q = relevant.T[columns]
        before, after, ranks = [], [], []
        for query_scores, query_relevant in zip(matrix_q, relevant_q, strict=True):
            returned = np.flatnonzero(np.isfinite(query_scores))
            order = returned[folding.rank(query_scores[returned], returned)]
            kept = _folded_top(boxes, artworks, order, top)
            before.append(folding.duplicate_share(boxes, artworks, order[:top]))
            after.append(folding.duplicate_share(boxes, artworks, np.asarray(kept)))
            hit = np.flatnonzero(query_relevant[kept])
            ranks.append(float(hit[0]) if len(hit) else np.inf)
        result[name] = {"duplicates_before": float(100 * np.mean(before)),
                        "duplicates_after": float(100 * np.mean(after)),
                        **{f"r{k_}": metrics.recall(np.asarray(ranks), k_) for k_ in metrics.KS},
                        "r10_unfolded": metrics.recall(metrics.ranks(matrix_q, relevant_q), 10)}
    return result


def _folded_top(boxes: np.ndarray, artworks: np.ndarray, order: np.ndarray, top: int) -> list[int]:
    """The first ``top`` fragments of ``order`` once folded: folds a prefix, twice as long
    while it folds to fewer (as the service fetches more candidates)."""
    prefix = 4 * top
    while True:
        kept = folding.fold(boxes, artworks, order[:prefix], limit=top)
        if len(kept) == top or prefix >= len(order):
            return [f.position for f in kept]
        prefix *= 2


def _served_folding(encoder: Encoder, collection: Collection, store: FeatureStore, *, split: str,
                    k: int, boxes_of: dict, query_phrases: list[str]) -> dict:
    """:func:`folding_effect` over the fragments the service indexes: whole, extracted and
    annotation boxes. An annotation box and the detection on it are the near-copies a visitor
    sees; the evaluation's own candidates leave annotation boxes out, and the detector's NMS
    keeps its detections apart."""
    served = split_fragments(collection, store, encoder.reader, split=split,
                             texts=list(dict.fromkeys(query_phrases)),
                             sources=("whole", "extracted", "annotation"))
    column_of = {text: i for i, text in enumerate(served.texts)}
    columns = np.asarray([column_of[phrase] for phrase in query_phrases], dtype=np.int64)
    relevant = phrase_relevance(served, served.texts, boxes_of)
    return folding_effect(score(encoder, served), relevant, served, columns, k=k)


def _with_texts(data: AlignmentData, texts: list[str], encoder: Encoder) -> AlignmentData:
    """``data`` with its texts replaced by ``texts`` (pairs dropped: relevance is by IoU)."""
    data.texts = list(texts)
    data.text_inputs = encoder.inputs(data.texts)
    data.pairs = np.zeros((0, 2), dtype=np.int64)
    return data


def _grounding(scores: Scores, candidates: AlignmentData, queries: list[tuple[int, str]],
               columns: np.ndarray, boxes_of: dict) -> dict:
    """R@1 of finding the phrase's box among the fragments of its own artwork."""
    hits = {name: [] for name in ("scan", "pooled")}
    for (number, phrase), column in zip(queries, columns, strict=True):
        own = np.flatnonzero(candidates.fragment_artworks == number)
        target_boxes, target_artworks = boxes_of[phrase]
        on_artwork = target_artworks == number
        relevant = metrics.iou_relevance(candidates.fragment_boxes[own],
                                         candidates.fragment_artworks[own],
                                         target_boxes[on_artwork], target_artworks[on_artwork])
        for name in hits:
            matrix = getattr(scores, name)[own, column].numpy()[None]  # (1, n_own)
            hits[name].append(metrics.ranks(matrix, relevant[None])[0])
    return {name: {"r1": metrics.recall(np.asarray(ranks), 1), "n": len(ranks)}
            for name, ranks in hits.items()}


def evaluate(checkpoint: Path, collection_root: Path, *, features: Path | None = None,
             split: str = "test", k: int = K_CANDIDATES, grain: str | None = None,
             device: str = "cpu") -> dict:
    """Every figure for one checkpoint on one split, as a JSON-ready dict."""
    model, vocab, ckpt = load_scan(checkpoint, device=device)
    record = ckpt.record or {}
    grain = grain or record.get("grain")
    if grain not in ("coarse", "fine"):
        raise ValueError(f"{checkpoint}: the checkpoint does not say its grain; pass --grain")
    collection = Collection.load(collection_root)
    store = open_store(collection.root, features)
    run = evaluate_coarse if grain == "coarse" else evaluate_fine
    result = run(Encoder(model, vocab), collection, store, split=split, k=k)
    return {"checkpoint": str(checkpoint), "model_version": ckpt.sha256,
            "collection": str(collection.root), "split": split, "grain": grain,
            "k_candidates": k, "config": ckpt.config, **result}


def _directions(result: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    if result["grain"] == "coarse":
        return ("image_annotation", "Image annotation"), ("image_retrieval", "Image retrieval")
    return ("crop_to_phrase", "Crop -> phrase"), ("phrase_to_fragment", "Phrase -> fragment")


def result_cells(result: dict, scorer: str) -> list[str]:
    cells = []
    for key, _ in _directions(result):
        cells += [f"{result[key][scorer][f'r{k}']:.1f}" for k in metrics.KS]
        cells.append(f"{result[key][scorer]['medr']:g}")
    cells.append(f"{result['rsum'][scorer]:.1f}")
    return cells


def format_table(header_rows: list[str], rows: list[tuple[str, list[str]]], result: dict) -> str:
    (_, first), (_, second) = _directions(result)
    head = ["", *[f"{first} R@{k}" for k in metrics.KS], "medr",
            *[f"{second} R@{k}" for k in metrics.KS], "medr", "rsum", *header_rows]
    table = [head] + [[label, *cells] for label, cells in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in table)


def format_result(result: dict) -> str:
    """One checkpoint's figures as a small text table, then what the two-stage path keeps."""
    scorers = (("SCAN (exhaustive)", "scan"),
               (f"two-stage (K={result['k_candidates']})", "two_stage"),
               ("pooled vectors (first stage)", "pooled"))
    rows = [(label, result_cells(result, scorer)) for label, scorer in scorers]
    lines = [f"{result['grain']} grain, split {result['split']}, {result['checkpoint']}",
             format_table([], rows, result)]
    for key, label in _directions(result):
        kept = result[key]["kept"]["r10"]
        lines.append(f"{label}: two-stage keeps "
                     + (f"{100 * kept:.1f}%" if kept is not None else "n/a (SCAN R@10 is 0)")
                     + " of exhaustive R@10")
    if result["grain"] == "fine":
        grounding = result["grounding"]
        lines.append(f"Phrase -> fragment: {result['phrase_to_fragment']['oracle']:.1f}% of "
                     "queries have any fragment with IoU >= 0.5 (the ceiling)")
        lines.append(f"Grounding within the artwork R@1: SCAN {grounding['scan']['r1']:.1f}, "
                     f"pooled {grounding['pooled']['r1']:.1f} (n={grounding['scan']['n']})")
        lines += _folding_lines(result["phrase_to_fragment"]["folding"])
    lines.append(f"counts: {result['counts']}")
    return "\n".join(lines)


def _folding_lines(folding: dict) -> list[str]:
    lines = ["Phrase -> fragment top-10 duplicates (IoU >= 0.7 with a higher one, same artwork), "
             "before -> after folding; R@1/5/10 after folding (R@10 before):"]
    for candidates, effects in folding.items():
        for scorer, effect in effects.items():
            lines.append(f"  {candidates} fragments, {scorer}: {effect['duplicates_before']:.1f}% -> "
                         f"{effect['duplicates_after']:.1f}%; R@1/5/10 {effect['r1']:.1f} / "
                         f"{effect['r5']:.1f} / {effect['r10']:.1f} ({effect['r10_unfolded']:.1f})")
    return lines


def plain_json(value):
    """``value`` with non-finite floats as None, so the JSON is standard (no Infinity)."""
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
