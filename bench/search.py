"""Two-stage search against exhaustive cross attention, per index kind, at up to 10M fragments.

    python -m bench.search [--fragments 1000000 --queries 50 --kinds flat ivf ivf-sq8 ivf-pq
                            --nprobe 8 16 32 --k 50 100 200 --threads 1 --json PATH]
    python -m bench.search --fragments 10000000 --kinds ivf-sq8 ivf-pq --truth-candidates 10000

Fragments are region sets in the joint space, built with structure so that a ranking means
something: ``--concepts`` random unit directions; each fragment shows one to three concepts,
each region a noisy copy of one of them; each query is two or three words, noisy copies of
one or two concepts. The noise is drawn from a bank of ``--noise-bank`` random vectors, so a
fragment is two small integer arrays (its regions' concepts and noise vectors) and any
fragment's region set can be rebuilt on demand: 10M fragments take 320 MB, not the 82 GB
their float32 region sets would. (The encoders are not involved: this measures the
retrieval machinery, FAISS plus the rerank, against scoring every fragment.)

For each query:

  exhaustive   ``xattn_similarity`` of the query against every fragment: the ground truth,
               the exact top 10 by SCAN score over all N fragments. All queries are scored
               together, in chunks of fragments; its time per query is that pass divided by
               the queries (amortised, so lower than one query alone would take).
               With ``--truth-candidates N`` the truth is instead the top 10 by SCAN over
               the query's exact top N by pooled cosine (flat search over every fragment):
               ``--compare-truth`` computes both and reports how far they agree (measured
               in docs/SCALING.md). The pooled one takes seconds at 10M fragments, where
               the exhaustive one would take hours on one thread.
  two-stage    pooled query vector -> FAISS top-K of the index kind, probing nprobe lists ->
               rebuild those K region sets -> ``xattn_similarity`` on them -> top 10.

Reported per index kind: build seconds (k-means training plus adding, one thread; the
pooled vectors are computed once beforehand and kept as float16 in a scratch file), index memory
(the saved FAISS file, which is what a replica holds), save seconds, update ms (remove and
re-add one artwork's 37 fragments, as an upload does before the save); per kind, nprobe and K:
median and p95 latency per query (FAISS search + rebuilding the K region sets + the rerank),
and overlap@10: |two-stage top 10 ∩ exhaustive top 10| / 10, averaged over the queries.
Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import add_json_argument, publish, require_positive, run_as_main

if TYPE_CHECKING:  # numpy and torch load inside the functions: `artalign --help` imports this module
    import numpy as np
    import torch

log = logging.getLogger(__name__)
TOP = 10
CHUNK = 2048  # fragments materialised at once: small enough to stay in the CPU's caches
ADD_CHUNK = 262_144  # vectors per add: each add first scans every list for the ids it replaces


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fragments", type=int, default=100_000, help="fragments (default %(default)s)")
    parser.add_argument("--queries", type=int, default=50, help="queries (default %(default)s)")
    parser.add_argument("--dim", type=int, default=256, help="joint-space size d (default %(default)s)")
    parser.add_argument("--max-regions", type=int, default=8,
                        help="regions per fragment, 2 to this (default %(default)s)")
    parser.add_argument("--concepts", type=int, default=2000, help="concept directions (default %(default)s)")
    parser.add_argument("--noise", type=float, default=0.6,
                        help="noise added to a concept to make a region or word (default %(default)s)")
    parser.add_argument("--noise-bank", type=int, default=65_536,
                        help="random noise vectors the regions draw from (default %(default)s)")
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "ivf-sq8", "ivf-pq"],
                        help="index kinds to build and compare (default %(default)s)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64],
                        help="IVF lists probed per query, compared (default %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[50, 100, 200],
                        help="first-stage candidate counts to compare (default %(default)s)")
    parser.add_argument("--truth-candidates", type=int, default=0, metavar="N",
                        help="0: the truth is exhaustive SCAN over every fragment; N: SCAN over "
                             "each query's exact pooled top N (for 10M fragments, where "
                             "exhaustive SCAN takes hours on one thread) (default %(default)s)")
    parser.add_argument("--compare-truth", action="store_true",
                        help="compute the exhaustive truth and also the --truth-candidates one, "
                             "and report how far they agree")
    parser.add_argument("--dir", type=Path, default=None,
                        help="scratch folder for the pooled vectors (float16, n·d·2 bytes) and "
                             "the saved indexes (default the system's temp folder)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and FAISS threads; 1 keeps timings steady on a shared "
                             "machine (default %(default)s)")
    add_json_argument(parser)


def _unit(x: np.ndarray) -> np.ndarray:
    import numpy as np

    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_data(options: argparse.Namespace) -> dict[str, Any]:
    """The collection as integers plus two small banks of vectors, and the queries (q, w, d)."""
    import numpy as np

    rng = np.random.default_rng(options.seed)
    n, r, d = options.fragments, options.max_regions, options.dim
    concepts = _unit(rng.normal(size=(options.concepts, d)))  # random unit directions
    bank = (rng.normal(size=(options.noise_bank, d)) / np.sqrt(d)).astype(np.float32)
    lens = rng.integers(2, r + 1, size=n).astype(np.int8)
    region_concepts = np.empty((n, r), dtype=np.int32)
    for start in range(0, n, 1_000_000):  # bounded temporaries at 10M fragments
        m = min(n, start + 1_000_000) - start
        shown = rng.integers(0, options.concepts, size=(m, 3))  # up to three concepts each
        pick = rng.integers(0, rng.integers(1, 4, size=m)[:, None], size=(m, r))
        region_concepts[start:start + m] = shown[np.arange(m)[:, None], pick]
    region_noise = rng.integers(0, options.noise_bank, size=(n, r), dtype=np.int32)
    q = options.queries
    words = rng.integers(2, 4, size=q)
    asked = rng.integers(0, options.concepts, size=(q, 2))
    per_word = asked[np.arange(q)[:, None], rng.integers(0, 2, size=(q, 3))]
    texts = _unit(concepts[per_word] + options.noise * rng.normal(size=(q, 3, d)) / np.sqrt(d))
    texts[np.arange(3)[None, :] >= words[:, None]] = 0
    return {"concepts": concepts, "bank": bank, "noise": options.noise, "lens": lens,
            "region_concepts": region_concepts, "region_noise": region_noise,
            "texts": texts, "words": words}


def region_sets(data: dict[str, Any], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(rows), r, d) unit region vectors, zero padded, and (len(rows),) region counts."""
    import numpy as np
    import torch

    regions = _unit(data["concepts"][data["region_concepts"][rows]]
                    + data["noise"] * data["bank"][data["region_noise"][rows]])
    lens = data["lens"][rows].astype(np.int64)
    regions[np.arange(regions.shape[1])[None, :] >= lens[:, None]] = 0
    return torch.from_numpy(regions), torch.from_numpy(lens)


def pooled_vectors(data: dict[str, Any], rows: np.ndarray) -> np.ndarray:
    """(len(rows), d) pooled fragment vectors, what the index holds."""
    from models.scan import pooled

    return pooled(*region_sets(data, rows)).numpy()


def score(data: dict[str, Any], rows: np.ndarray, queries: slice) -> torch.Tensor:
    """(len(rows), n_queries) SCAN scores with the service's defaults (t2i, LSE, λ 9 and 6)."""
    import torch

    images, image_lens = region_sets(data, rows)
    return xattn(images, image_lens, torch.from_numpy(data["texts"][queries]),
                 torch.from_numpy(data["words"][queries]))


def xattn(images: torch.Tensor, image_lens: torch.Tensor, texts: torch.Tensor,
          text_lens: torch.Tensor) -> torch.Tensor:
    from models.scan import xattn_similarity

    return xattn_similarity(images, image_lens, texts, text_lens, direction="t2i", agg="lse",
                            lambda_softmax=9.0, lambda_lse=6.0, chunk_size=4096)


def top(scores: np.ndarray, rows: np.ndarray) -> list[int]:
    """The TOP rows by score, best first, ties by row."""
    import numpy as np

    return rows[np.lexsort((rows, -scores))[:TOP]].tolist()


def exhaustive_truth(data: dict[str, Any]) -> list[list[int]]:
    """Each query's exact top 10 over every fragment, scanning all fragments in chunks with
    all queries at once."""
    import numpy as np
    from tqdm import tqdm

    n, q = len(data["lens"]), len(data["texts"])
    best_scores = np.full((q, TOP), -np.inf, dtype=np.float32)
    best_rows = np.full((q, TOP), -1, dtype=np.int64)
    for start in tqdm(range(0, n, CHUNK), desc="exhaustive SCAN", unit="chunk"):
        rows = np.arange(start, min(n, start + CHUNK))
        scores = score(data, rows, slice(None)).numpy().T  # (q, chunk)
        for query in range(q):
            merged_scores = np.concatenate([best_scores[query], scores[query]])
            merged_rows = np.concatenate([best_rows[query], rows])
            keep = np.lexsort((merged_rows, -merged_scores))[:TOP]
            best_scores[query], best_rows[query] = merged_scores[keep], merged_rows[keep]
    return best_rows.tolist()


def pooled_pass(data: dict[str, Any], folder: Path, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Every fragment's pooled vector, into a float16 file under ``folder`` (so the index
    builds read them instead of rebuilding region sets); with ``candidates`` > 0 also each
    query's exact top ``candidates`` rows by pooled cosine, (q, candidates)."""
    import numpy as np
    from tqdm import tqdm

    n, d = len(data["lens"]), data["concepts"].shape[1]
    vectors = np.lib.format.open_memmap(folder / "pooled.npy", mode="w+", dtype=np.float16, shape=(n, d))
    q = len(data["texts"])
    best_scores = np.full((q, candidates), -np.inf, dtype=np.float32)
    best_rows = np.full((q, candidates), -1, dtype=np.int64)
    for start in tqdm(range(0, n, CHUNK), desc="pooled vectors", unit="chunk"):
        rows = np.arange(start, min(n, start + CHUNK))
        chunk = pooled_vectors(data, rows)  # (chunk, d)
        vectors[rows] = chunk
        if candidates:
            scores = np.concatenate([best_scores, data["query_vectors"] @ chunk.T], axis=1)
            merged = np.concatenate([best_rows, np.broadcast_to(rows, (q, len(rows)))], axis=1)
            keep = np.argpartition(-scores, candidates - 1, axis=1)[:, :candidates]
            best_scores = np.take_along_axis(scores, keep, axis=1)
            best_rows = np.take_along_axis(merged, keep, axis=1)
    return vectors, best_rows


def pooled_truth(data: dict[str, Any], candidates: np.ndarray) -> list[list[int]]:
    """Each query's top 10 by SCAN over its exact pooled top-N rows."""
    candidates = [rows[rows >= 0] for rows in candidates]  # -1: fewer fragments than N
    return [top(score(data, rows, slice(query, query + 1))[:, 0].numpy(), rows)
            for query, rows in enumerate(candidates)]


def build_index(vectors: np.ndarray, kind: str, options: argparse.Namespace,
                folder: Path) -> tuple[Any, dict]:
    """The index of ``kind`` over every pooled vector, trained on a sample, filled chunk by
    chunk; and its build time (training and adding only), memory (the saved file) and save
    time."""
    import numpy as np
    from tqdm import tqdm

    from index.vectors import PQ_TRAIN_POINTS, TRAIN_POINTS_PER_LIST, VectorIndex, plan_index

    n = len(vectors)
    plan = plan_index(n, options.dim, kind=kind)
    index = VectorIndex(options.dim, plan, use_gpu=False)
    build_seconds = 0.0
    if plan.kind != "flat":
        wanted = max(plan.nlist * TRAIN_POINTS_PER_LIST, PQ_TRAIN_POINTS if kind == "ivf-pq" else 0)
        sample = np.asarray(vectors[np.sort(np.random.default_rng(options.seed).permutation(n)[:wanted])],
                            dtype=np.float32)
        started = time.perf_counter()
        index.train(sample, seed=options.seed)
        build_seconds += time.perf_counter() - started
    for start in tqdm(range(0, n, ADD_CHUNK), desc=f"adding to {kind}", unit="chunk"):
        rows = np.arange(start, min(n, start + ADD_CHUNK))
        chunk = np.asarray(vectors[start:start + len(rows)], dtype=np.float32)
        started = time.perf_counter()
        index.add(rows, chunk)
        build_seconds += time.perf_counter() - started
    update_ms = _update_ms(index, vectors)
    started = time.perf_counter()
    manifest = index.save(folder / kind, model_version="bench", state={})
    save_seconds = time.perf_counter() - started
    memory = sum(p.stat().st_size for p in manifest.parent.glob("index-*.faiss"))
    for path in manifest.parent.iterdir():
        path.unlink()
    return index, {"kind": kind, "nlist": plan.nlist, "pq_bytes": plan.pq_bytes,
                   "build_seconds": round(build_seconds, 1), "save_seconds": round(save_seconds, 2),
                   "update_ms": update_ms,
                   "memory_bytes": memory, "bytes_per_vector": round(memory / n, 1)}


def _update_ms(index: Any, vectors: np.ndarray, repeats: int = 5) -> float:
    """Median ms to replace one artwork's 37 fragments (remove their ids, add them again):
    what an upload or a re-ingest costs the index, before it is saved."""
    import numpy as np

    rng = np.random.default_rng(1)
    times = []
    for _ in range(repeats):
        rows = np.sort(rng.choice(len(vectors), size=37, replace=False))
        chunk = np.asarray(vectors[rows], dtype=np.float32)
        started = time.perf_counter()
        index.remove(rows)
        index.add(rows, chunk)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def two_stage(data: dict[str, Any], index: Any, k: int, truth: list[list[int]]) -> dict[str, Any]:
    """Latency and overlap@10 of FAISS top ``k`` + rerank, query by query."""
    import numpy as np

    query_vectors = data["query_vectors"]  # (q, d) pooled word vectors
    times, overlaps = [], []
    for query in range(len(truth)):
        started = time.perf_counter()
        _, found = index.search(query_vectors[query:query + 1], k)
        rows = found[0][found[0] >= 0]
        ranked = top(score(data, rows, slice(query, query + 1))[:, 0].numpy(), rows)
        times.append(time.perf_counter() - started)
        overlaps.append(len(set(ranked) & set(truth[query])) / TOP)
    return {"k": k, **_summary(times), "overlap@10": round(float(np.mean(overlaps)), 4)}


def run(options: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import torch

    from models.scan import pooled

    torch.set_num_threads(options.threads)
    faiss.omp_set_num_threads(options.threads)
    started = time.perf_counter()
    data = make_data(options)
    data["query_vectors"] = pooled(torch.from_numpy(data["texts"]), torch.from_numpy(data["words"])).numpy()
    log.info("made %d fragments in %.1f s", options.fragments, time.perf_counter() - started)
    with tempfile.TemporaryDirectory(dir=options.dir) as scratch:
        folder = Path(scratch)
        vectors, candidates = pooled_pass(data, folder, options.truth_candidates)
        truth = ground_truth(data, candidates, options)
        methods = [truth.pop("method")] if "method" in truth else []
        indexes = []
        for kind in options.kinds:
            index, built = build_index(vectors, kind, options, folder)
            indexes.append(built)
            log.info("built %s", built)
            for nprobe in ([None] if kind == "flat" else options.nprobe):
                if nprobe is not None:
                    index.set_nprobe(nprobe)
                for k in options.k:
                    methods.append({"method": kind, "nprobe": nprobe,
                                    **two_stage(data, index, k, truth["rows"])})
                    log.info("%s", methods[-1])
            del index
        del vectors
    del truth["rows"]
    return {
        "benchmark": "search",
        "fragments": options.fragments, "queries": options.queries, "dim": options.dim,
        "max_regions": options.max_regions, "concepts": options.concepts, "noise": options.noise,
        **truth, "truth_candidates": options.truth_candidates, "indexes": indexes,
        "machine": {"python": platform.python_version(), "threads": options.threads,
                    "processor": platform.processor() or platform.machine()},
        "methods": methods,
    }


def ground_truth(data: dict[str, Any], candidates: np.ndarray, options: argparse.Namespace) -> dict:
    """Each query's true top 10 ("rows"), how it was found and how long that took; with
    ``--compare-truth`` the exhaustive one, and how far the pooled-candidate one agrees."""
    import numpy as np

    started = time.perf_counter()
    exhaustive = options.compare_truth or not options.truth_candidates
    rows = exhaustive_truth(data) if exhaustive else pooled_truth(data, candidates)
    seconds = time.perf_counter() - started
    truth = {"truth": "exhaustive SCAN over every fragment" if exhaustive else
             f"SCAN over each query's exact pooled top {options.truth_candidates:,}",
             "truth_seconds": round(seconds, 1), "rows": rows}
    if exhaustive:
        truth["method"] = {"method": "exhaustive", "nprobe": None, "k": options.fragments,
                           "median_ms": round(seconds / options.queries * 1000, 2),
                           "p95_ms": None, "overlap@10": 1.0}
    if options.compare_truth:
        pooled_rows = pooled_truth(data, candidates)
        truth["pooled_truth_agreement"] = round(float(np.mean(
            [len(set(a) & set(b)) / TOP for a, b in zip(rows, pooled_rows, strict=True)])), 4)
    return truth


def _summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"median_ms": round(statistics.median(ordered) * 1000, 2), "p95_ms": round(p95 * 1000, 2)}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"search: {report['fragments']:,} fragments (d={report['dim']}, <= {report['max_regions']} "
        f"regions), {report['queries']} queries, {report['machine']['threads']} thread(s); "
        f"truth: {report['truth']} ({report['truth_seconds']} s for all queries)"
        + (f"; SCAN over the pooled top {report['truth_candidates']:,} agrees on "
           f"{report['pooled_truth_agreement']:.3f} of it" if "pooled_truth_agreement" in report else ""),
        f"{'index':<8} {'nlist':>6} {'PQ B':>5} {'build s':>8} {'save s':>7} {'update ms':>10} "
        f"{'memory MB':>10} {'B/vector':>9}",
    ]
    for i in report["indexes"]:
        lines.append(f"{i['kind']:<8} {i['nlist'] or '-':>6} {i['pq_bytes'] or '-':>5} "
                     f"{i['build_seconds']:>8.1f} {i['save_seconds']:>7.2f} {i['update_ms']:>10.2f} "
                     f"{i['memory_bytes'] / 1e6:>10.1f} {i['bytes_per_vector']:>9.1f}")
    lines.append(f"{'method':<11} {'nprobe':>6} {'K':>10} {'median ms':>10} {'p95 ms':>9} {'overlap@10':>11}")
    for m in report["methods"]:
        p95 = "-" if m["p95_ms"] is None else f"{m['p95_ms']:.2f}"
        lines.append(f"{m['method']:<11} {m['nprobe'] or '-':>6} {m['k']:>10,} {m['median_ms']:>10.2f} "
                     f"{p95:>9} {m['overlap@10']:>11.3f}")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    from index.vectors import KINDS

    if options.truth_candidates < 0 or (options.compare_truth and not options.truth_candidates):
        raise ValueError("--truth-candidates must be 0 (exhaustive) or positive, and positive "
                         "with --compare-truth")
    require_positive(options, "fragments", "queries", "dim", "concepts", "noise_bank", "threads")
    if options.max_regions < 2 or min(options.k) < 1 or min(options.nprobe) < 1:
        raise ValueError("--max-regions must be at least 2, every --k and --nprobe at least 1")
    unknown = set(options.kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"--kinds: unknown {sorted(unknown)}; choose from {list(KINDS)}")
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.search", __doc__, add_arguments, main)
