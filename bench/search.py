"""Two-stage search against exhaustive cross attention, side by side on synthetic fragments.

    python -m bench.search [--fragments 100000 --queries 50 --dim 64 --json PATH]

Fragments are region sets in the joint space, built with structure so that a ranking means
something: ``--concepts`` random unit directions; each fragment shows one to three concepts,
each region a noisy copy of one of them; each query is two or three words, noisy copies of
one or two concepts. (The encoders are not involved: this measures the retrieval machinery,
FAISS plus the rerank, against scoring every fragment.)

For each query, side by side:

  exhaustive   ``xattn_similarity`` of the query against every fragment (the ground truth);
  two-stage    pooled query vector -> FAISS top-K fragments (exact flat index, and the IVF
               index used above 50,000 vectors) -> ``xattn_similarity`` on those K.

Reported per method: median and p95 latency per query, speedup over exhaustive, and the
overlap of its top 10 with the exhaustive top 10. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import publish, run_as_main

if TYPE_CHECKING:  # numpy and torch load inside the functions: `artalign --help` imports this module
    import numpy as np

log = logging.getLogger(__name__)
TOP = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fragments", type=int, default=100_000, help="fragments (default %(default)s)")
    parser.add_argument("--queries", type=int, default=50, help="queries (default %(default)s)")
    parser.add_argument("--exhaustive-queries", type=int, default=10,
                        help="queries also timed exhaustively, one by one; all are ranked "
                             "exhaustively for the overlap (default %(default)s)")
    parser.add_argument("--dim", type=int, default=64, help="joint-space size d (default %(default)s)")
    parser.add_argument("--max-regions", type=int, default=8,
                        help="regions per fragment, 2 to this (default %(default)s)")
    parser.add_argument("--concepts", type=int, default=2000, help="concept directions (default %(default)s)")
    parser.add_argument("--noise", type=float, default=0.6,
                        help="noise added to a concept to make a region or word (default %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[50, 100, 200, 1000],
                        help="first-stage candidate counts to compare (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps timings steady on a shared machine (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the JSON report here (atomically)")


def _noisy(rng: np.random.Generator, centres: np.ndarray, noise: float) -> np.ndarray:
    import numpy as np

    x = centres + noise * rng.normal(size=centres.shape) / np.sqrt(centres.shape[-1])
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_data(options: argparse.Namespace) -> dict[str, Any]:
    """Fragments (n, r, d) zero padded + lens, and queries (q, w, d) + lens, all unit rows."""
    import numpy as np

    rng = np.random.default_rng(options.seed)
    n, r, d = options.fragments, options.max_regions, options.dim
    concepts = _noisy(rng, np.zeros((options.concepts, d)), 1.0)  # random unit directions
    lens = rng.integers(2, r + 1, size=n)
    shown = rng.integers(0, options.concepts, size=(n, 3))  # up to three concepts per fragment
    per_region = shown[np.arange(n)[:, None], rng.integers(0, rng.integers(1, 4, size=n)[:, None], size=(n, r))]
    regions = _noisy(rng, concepts[per_region], options.noise)  # (n, r, d)
    regions[np.arange(r)[None, :] >= lens[:, None]] = 0
    q = options.queries
    words = rng.integers(2, 4, size=q)
    asked = rng.integers(0, options.concepts, size=(q, 2))
    per_word = asked[np.arange(q)[:, None], rng.integers(0, 2, size=(q, 3))]
    texts = _noisy(rng, concepts[per_word], options.noise)  # (q, 3, d)
    texts[np.arange(3)[None, :] >= words[:, None]] = 0
    return {"regions": regions, "lens": lens, "texts": texts, "words": words}


def run(options: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from models.scan import pooled, xattn_similarity

    torch.set_num_threads(options.threads)
    data = make_data(options)
    images = torch.from_numpy(data["regions"])  # (n, r, d)
    image_lens = torch.from_numpy(data["lens"])
    texts = torch.from_numpy(data["texts"])  # (q, w, d)
    text_lens = torch.from_numpy(data["words"])
    ids = np.arange(len(images), dtype=np.int64)

    def score(image_rows: torch.Tensor, query: int) -> torch.Tensor:
        # The service's defaults: t2i, LSE, λ_softmax 9, λ_lse 6. Big blocks: one text.
        return xattn_similarity(images[image_rows], image_lens[image_rows], texts[query:query + 1],
                                text_lens[query:query + 1], direction="t2i", agg="lse",
                                lambda_softmax=9.0, lambda_lse=6.0, chunk_size=4096)[:, 0]

    def top(scores: torch.Tensor, rows: np.ndarray) -> list[int]:
        order = np.lexsort((rows, -scores.numpy()))[:TOP]  # best first, ties by id
        return rows[order].tolist()

    log.info("building the indexes over %d pooled fragment vectors", len(ids))
    vectors = pooled(images, image_lens).numpy()  # (n, d)
    indexes, build_seconds = _build_indexes(ids, vectors)
    query_vectors = pooled(texts, text_lens).numpy()  # (q, d)

    log.info("ranking %d queries exhaustively", options.queries)
    truth, exhaustive_times = [], []
    all_rows = torch.arange(len(ids))
    for query in range(options.queries):
        started = time.perf_counter()
        truth.append(top(score(all_rows, query), ids))
        if query < options.exhaustive_queries:
            exhaustive_times.append(time.perf_counter() - started)

    methods = [{"method": "exhaustive", "k": len(ids), **_summary(exhaustive_times), "overlap@10": 1.0}]
    for kind, index in indexes.items():
        for k in options.k:
            times, overlaps = [], []
            for query in range(options.queries):
                started = time.perf_counter()
                _, found = index.search(query_vectors[query:query + 1], k)
                rows = found[0][found[0] >= 0]
                ranked = top(score(torch.from_numpy(rows), query), rows)
                times.append(time.perf_counter() - started)
                overlaps.append(len(set(ranked) & set(truth[query])) / TOP)
            methods.append({"method": f"two-stage {kind}", "k": k, **_summary(times),
                            "overlap@10": round(float(np.mean(overlaps)), 4)})
    return _report(options, ids, indexes, build_seconds, methods)


def _build_indexes(ids: np.ndarray, vectors: np.ndarray) -> tuple[dict[str, Any], dict[str, float]]:
    """A flat (exact) and an IVF index over the pooled vectors, and their build times."""
    from index.vectors import VectorIndex

    indexes, seconds = {}, {}
    for kind, exact_below in (("flat", len(ids) + 1), ("ivf", 1)):
        started = time.perf_counter()
        indexes[kind] = VectorIndex.build(ids, vectors, exact_below=exact_below, use_gpu=False)
        seconds[kind] = time.perf_counter() - started
    return indexes, seconds


def _report(options: argparse.Namespace, ids: np.ndarray, indexes: dict[str, Any],
            build_seconds: dict[str, float], methods: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    exhaustive_ms = methods[0]["median_ms"]
    for method in methods:
        method["speedup"] = round(exhaustive_ms / method["median_ms"], 1)
    return {
        "benchmark": "search",
        "fragments": len(ids), "queries": options.queries, "dim": options.dim,
        "max_regions": options.max_regions, "concepts": options.concepts, "noise": options.noise,
        "ivf": {"nlist": indexes["ivf"].nlist, "nprobe": indexes["ivf"].nprobe},
        "build_seconds": {k: round(v, 2) for k, v in build_seconds.items()},
        "machine": {"python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
        "methods": methods,
    }


def _summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"median_ms": round(statistics.median(ordered) * 1000, 2), "p95_ms": round(p95 * 1000, 2)}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"search: {report['fragments']:,} fragments (d={report['dim']}, <= {report['max_regions']} "
        f"regions), {report['queries']} queries; IVF nlist={report['ivf']['nlist']} "
        f"nprobe={report['ivf']['nprobe']}",
        f"{'method':<18} {'K':>8} {'median ms':>10} {'p95 ms':>9} {'speedup':>8} {'overlap@10':>11}",
    ]
    for m in report["methods"]:
        lines.append(f"{m['method']:<18} {m['k']:>8,} {m['median_ms']:>10.2f} {m['p95_ms']:>9.2f} "
                     f"{m['speedup']:>7.1f}x {m['overlap@10']:>11.3f}")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    for name in ("fragments", "queries", "dim", "concepts"):
        if getattr(options, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if options.max_regions < 2 or min(options.k) < 1:
        raise ValueError("--max-regions must be at least 2 and every --k at least 1")
    options.exhaustive_queries = min(options.exhaustive_queries, options.queries)
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.search", __doc__, add_arguments, main)
