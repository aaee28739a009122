"""`artalign evaluate --queries FILE`: phrase -> fragment recall with a museum's own wording.

FILE holds JSON lines ``{"query": "golden birds", "phrase": "two gold birds"}``, optionally
with ``"kind"`` (a label such as "synonym"; recall is also broken down by it). The query
text stands in for an annotated phrase of the split: it is scored against every whole-image
and extracted fragment of the split (as in :func:`training.evaluate.evaluate_fine`), and a
fragment is relevant when it overlaps a box annotated with ``phrase`` (IoU >= 0.5, same
artwork). Each line is one query. The same lines are also scored with the annotated phrase
itself, so the two rows show what the wording costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collection.layout import Collection
from models.encoder import Encoder
from models.scan import load_scan
from models.vocab import tokenize
from training import metrics
from training.data import open_store, split_fragments
from training.evaluate import (
    K_CANDIDATES,
    SCORERS,
    Scores,
    phrase_boxes,
    phrase_relevance,
    score,
    task,
)

FIELDS = {"query", "phrase", "kind"}


@dataclass(frozen=True)
class Query:
    line: int
    query: str
    phrase: str
    kind: str


def read_queries(path: Path) -> list[Query]:
    """The lines of a queries file; a ValueError naming the file and line for any bad one."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the queries file: {exc}") from exc
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg}); each line must be an object "
                             '{"query": "...", "phrase": "..."}') from exc
        if not isinstance(value, dict):
            raise ValueError(f'{where}: a JSON {type(value).__name__}, not an object '
                             '{"query": "...", "phrase": "..."}')
        unknown = sorted(set(value) - FIELDS)
        missing = sorted({"query", "phrase"} - set(value))
        if unknown or missing:
            raise ValueError(f"{where}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown field(s) {', '.join(unknown)} (known: {sorted(FIELDS)})"]
                   if unknown else [])))
        for name in FIELDS & set(value):
            if not isinstance(value[name], str):
                raise ValueError(f"{where}: {name} must be a string, got {value[name]!r}")
        if not tokenize(value["query"]):
            raise ValueError(f"{where}: query {value['query']!r} has no words")
        queries.append(Query(number, value["query"], value["phrase"], value.get("kind", "")))
    if not queries:
        raise ValueError(f"{path}: no queries (the file is empty)")
    return queries


def evaluate_queries(checkpoint: Path, collection_root: Path, queries_file: Path, *,
                     features: Path | None = None, split: str = "test", k: int = K_CANDIDATES,
                     device: str = "cpu") -> dict:
    """Phrase -> fragment recall of the file's queries, and of their annotated phrases."""
    queries = read_queries(queries_file)
    collection = Collection.load(collection_root)
    artworks = collection.split(split)
    boxes_of = phrase_boxes(artworks)
    unknown = [q for q in queries if q.phrase not in boxes_of]
    if unknown:
        shown = ", ".join(f"line {q.line} ({q.phrase!r})" for q in unknown[:5])
        raise ValueError(f"{queries_file}: {len(unknown)} phrase(s) are not annotated on any "
                         f"artwork of split {split!r} of {collection.root}: {shown}"
                         + (" ..." if len(unknown) > 5 else ""))
    model, vocab, ckpt = load_scan(checkpoint, device=device)
    store = open_store(collection.root, features)
    texts = list(dict.fromkeys([q.query for q in queries] + [q.phrase for q in queries]))
    encoder = Encoder(model, vocab)
    candidates = split_fragments(collection, store, encoder.reader, split=split, texts=texts)
    scores = score(encoder, candidates)
    column_of = {text: i for i, text in enumerate(candidates.texts)}
    relevant = phrase_relevance(candidates, [q.phrase for q in queries], boxes_of)  # (n_frag, n_q)
    result: dict = {"checkpoint": str(checkpoint), "model_version": ckpt.sha256,
                    "text_encoder": model.config.text_encoder, "collection": str(collection.root),
                    "split": split, "queries_file": str(queries_file), "k_candidates": k,
                    "counts": {"queries": len(queries), "fragments": len(candidates.fragment_rows)}}
    kinds = list(dict.fromkeys(q.kind for q in queries))
    for name, attribute in (("queries", "query"), ("phrases", "phrase")):
        columns = np.asarray([column_of[getattr(q, attribute)] for q in queries], dtype=np.int64)
        chosen = Scores(scores.scan[:, columns], scores.pooled[:, columns])
        result[name] = task(chosen, relevant, queries_are_rows=False, k=k)
        query_ranks = metrics.ranks(chosen.scan.T, relevant.T)
        result[name]["by_kind"] = {
            kind: {"n": int(sum(q.kind == kind for q in queries)),
                   "r1": metrics.recall(query_ranks[[q.kind == kind for q in queries]], 1)}
            for kind in kinds}
    return result


def format_queries(result: dict) -> str:
    """The two rows (queries, annotated phrases) per scorer, then R@1 by kind."""
    head = ["phrase -> fragment", "R@1", "R@5", "R@10", "medr"]
    rows = []
    for scorer in SCORERS:
        for name, label in (("queries", "query text"), ("phrases", "annotated phrase")):
            cells = result[name][scorer]
            rows.append([f"{label}, {scorer}", *[f"{cells[f'r{k}']:.1f}" for k in metrics.KS],
                         f"{cells['medr']:g}"])
    lines = [f"{result['queries_file']}: {result['counts']['queries']} queries, split "
             f"{result['split']}, {result['checkpoint']} ({result['text_encoder']})",
             _columns([head, *rows])]
    kinds = result["queries"]["by_kind"]
    if len(kinds) > 1 or "" not in kinds:
        by_kind = [["kind", "n", "query R@1", "phrase R@1"]]
        by_kind += [[kind or "(none)", str(v["n"]), f"{v['r1']:.1f}",
                     f"{result['phrases']['by_kind'][kind]['r1']:.1f}"] for kind, v in kinds.items()]
        lines += ["exhaustive SCAN by kind:", _columns(by_kind)]
    return "\n".join(lines)


def _columns(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in table)
