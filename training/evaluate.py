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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from collection.layout import Collection
from models.scan import SCAN, load_scan, pooled
from models.text import TextReader
from models.vocab import Vocabulary
from training import metrics
from training.data import (
    MAX_WORDS,
    AlignmentData,
    alignment_data,
    encode_text,
    gather_regions,
    open_store,
    read_texts,
    split_fragments,
    text_batch,
)

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
def score(model: SCAN, data: AlignmentData, *, chunk: int = 256, progress: bool = True) -> Scores:
    """SCAN and pooled scores of every fragment of ``data`` against every text of ``data``.

    Texts are encoded once; fragments in chunks of ``chunk``, sorted by region count so that
    a chunk pads little.
    """
    model.eval()
    device = next(model.parameters()).device
    word_ids, word_lens = text_batch(data, range(len(data.texts)))
    texts = model.encode_texts(word_ids.to(device), word_lens.to(device))  # (n_txt, w, d)
    word_lens = word_lens.to(device)
    text_pooled = pooled(texts, word_lens)  # (n_txt, d)
    n = len(data.fragment_rows)
    scan = torch.empty(n, len(data.texts))
    cosine = torch.empty(n, len(data.texts))
    order = np.argsort([len(rows) for rows in data.fragment_rows], kind="stable")
    for start in tqdm(range(0, n, chunk), desc="scoring fragments", unit="chunk",
                      disable=not progress, leave=False):
        members = order[start:start + chunk]
        raw, lens = gather_regions(data.store, [data.fragment_rows[i] for i in members])
        lens = lens.to(device)
        images = model.encode_images(raw.to(device), lens)  # (c, r, d)
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


def evaluate_coarse(model: SCAN, collection: Collection, store: FeatureStore,
                    vocab: Vocabulary, *, split: str, k: int) -> dict:
    reader = TextReader.of(model.config, vocab)
    data = read_texts(alignment_data(collection, store, vocab, grain="coarse", split=split), reader)
    scores = score(model, data)
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


def evaluate_fine(model: SCAN, collection: Collection, store: FeatureStore,
                  vocab: Vocabulary, *, split: str, k: int) -> dict:
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
    reader = TextReader.of(model.config, vocab)
    crops = read_texts(_with_texts(alignment_data(collection, store, vocab, grain="fine",
                                                  split=split, supervision="boxes"),
                                   all_phrases, vocab), reader)
    crop_scores = score(model, crops)
    crop_relevant = phrase_relevance(crops, crops.texts, boxes_of)
    crop_to_phrase = task(crop_scores, crop_relevant, queries_are_rows=True, k=k)

    # phrase -> fragment: one query per annotated (artwork, phrase); a phrase's text is scored
    # once and its column is repeated for every artwork that has it annotated.
    queries = list(dict.fromkeys((number_of[a.id], n.phrase) for a in annotated
                                 for n in a.annotations))
    query_phrases = list(dict.fromkeys(phrase for _, phrase in queries))
    candidates = read_texts(split_fragments(collection, store, vocab, split=split,
                                            texts=query_phrases), reader)
    column_of = {text: i for i, text in enumerate(candidates.texts)}
    queries = [(number, phrase) for number, phrase in queries if phrase in column_of]
    columns = np.asarray([column_of[phrase] for _, phrase in queries], dtype=np.int64)
    fragment_scores = score(model, candidates)
    fragment_relevant = phrase_relevance(candidates, candidates.texts, boxes_of)
    phrase_to_fragment = task(fragment_scores, fragment_relevant, queries_are_rows=False, k=k,
                              query_rows=columns)
    phrase_to_fragment["oracle"] = float(100 * fragment_relevant[:, columns].any(axis=0).mean())
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


def _with_texts(data: AlignmentData, texts: list[str], vocab: Vocabulary) -> AlignmentData:
    """``data`` with its texts replaced by ``texts`` (pairs dropped: relevance is by IoU)."""
    kept = [(t, encode_text(t, vocab, MAX_WORDS)) for t in texts]
    kept = [(t, ids) for t, ids in kept if ids]
    data.texts = [t for t, _ in kept]
    data.text_ids = [ids for _, ids in kept]
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
    result = run(model, collection, store, vocab, split=split, k=k)
    return {"checkpoint": str(checkpoint), "model_version": ckpt.sha256,
            "collection": str(collection.root), "split": split, "grain": grain,
            "k_candidates": k, "config": ckpt.config, **result}


# The thesis's Table 4.1 rows: (label, direction, agg, bidirectional GRU).
GRID = (
    ("t-i LSE", "t2i", "lse", True),
    ("t-i AVG", "t2i", "mean", True),
    ("i-t LSE", "i2t", "lse", True),
    ("i-t AVG", "i2t", "mean", True),
    ("uni-GRU i-t AVG", "i2t", "mean", False),
)


def run_grid(checkpoint: Path, collection_root: Path, *, features: Path | None = None,
             split: str = "test", k: int = K_CANDIDATES, epochs: int | None = None,
             device: str = "cpu") -> dict:
    """Train and evaluate the five Table 4.1 variants with ``checkpoint``'s other options.

    Each variant's checkpoint goes to ``<checkpoint stem>-grid/<variant>.pt``; the thesis's
    per-direction λ_softmax defaults apply (t2i 9, i2t 4).
    """
    from models.checkpoint import load_checkpoint
    from training.train import TrainOptions, train

    base = load_checkpoint(checkpoint, kind="scan").record or {}
    if "options" not in base:
        raise ValueError(f"{checkpoint}: its record holds no training options to vary")
    folder = Path(checkpoint).parent / f"{Path(checkpoint).stem}-grid"
    rows = []
    for label, direction, agg, bidirectional in GRID:
        options = dict(base["options"], collection=str(collection_root), direction=direction,
                       agg=agg, bidirectional=bidirectional, lambda_softmax=None, resume=False,
                       device=device, out=str(folder / f"{label.replace(' ', '-')}.pt"))
        if features is not None:
            options["features"] = str(features)
        if epochs is not None:
            options["epochs"] = epochs
            options["lr_update"] = min(options["lr_update"], epochs)
        log.info("grid row %s: training %s", label, options["out"])
        trained = train(TrainOptions.from_dict(options))
        result = evaluate(trained.checkpoint, collection_root, features=features, split=split,
                          k=k, device=device)
        result["label"] = label
        result["epoch_seconds"] = [row["train_seconds"] for row in trained.history]
        rows.append(result)
    return {"grain": rows[0]["grain"], "split": split, "rows": rows}


def _directions(result: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    if result["grain"] == "coarse":
        return ("image_annotation", "Image annotation"), ("image_retrieval", "Image retrieval")
    return ("crop_to_phrase", "Crop -> phrase"), ("phrase_to_fragment", "Phrase -> fragment")


def _cells(result: dict, scorer: str) -> list[str]:
    cells = []
    for key, _ in _directions(result):
        cells += [f"{result[key][scorer][f'r{k}']:.1f}" for k in metrics.KS]
        cells.append(f"{result[key][scorer]['medr']:g}")
    cells.append(f"{result['rsum'][scorer]:.1f}")
    return cells


def _table(header_rows: list[str], rows: list[tuple[str, list[str]]], result: dict) -> str:
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
    rows = [(label, _cells(result, scorer)) for label, scorer in scorers]
    lines = [f"{result['grain']} grain, split {result['split']}, {result['checkpoint']}",
             _table([], rows, result)]
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
    lines.append(f"counts: {result['counts']}")
    return "\n".join(lines)


def format_grid(grid: dict) -> str:
    """The five variants as one table, like the thesis's Table 4.1 (exhaustive SCAN)."""
    rows = [(row["label"], [*_cells(row, "scan"), f"{row['rsum']['pooled']:.1f}",
                            f"{np.mean(row['epoch_seconds']):.0f}"]) for row in grid["rows"]]
    return (f"{grid['grain']} grain, split {grid['split']} (exhaustive SCAN)\n"
            + _table(["pooled rsum", "s/epoch"], rows, grid["rows"][0]))


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
