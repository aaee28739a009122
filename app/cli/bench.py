"""`artalign bench ...`: benchmarks that compare implementations side by side.

Each benchmark is a module of bench/ with ``add_arguments(parser)`` and ``main(options)``
(also runnable as ``python -m bench.NAME``). Their top-level imports are standard library
only, so importing them here for their arguments keeps ``artalign --help`` fast; numpy,
torch, httpx and the rest load when a benchmark runs.
"""

from __future__ import annotations

import argparse
import importlib

# (sub-command, module, help): one row per benchmark.
BENCHMARKS = [
    ("scoring", "bench.scoring",
     "cross-attention scoring: batched xattn_similarity vs a per-caption loop vs one matmul"),
    ("search", "bench.search",
     "two-stage search (FAISS top-K, then cross attention) vs scoring every fragment"),
    ("extract", "bench.extract",
     "region-extraction throughput per detector backbone, on the same images"),
    ("training", "bench.training",
     "training speed, CPU against GPU side by side: detector steps and SCAN steps"),
    ("ray-extract", "bench.ray_extract",
     "region extraction: the local path vs the Ray path, plus the per-image sizes for scaling"),
    ("text", "bench.text",
     "the text side, GRU vs MiniLM: query encoding p50/p95, phrase index build, training step"),
    ("store", "bench.store",
     "feature store: open, refresh, append and read cost vs shards written, before and after compaction"),
    ("http", "bench.http",
     "HTTP latency (p50/p95) of GET /search and POST /annotate on a running service; with "
     "--stored, upload latency with N fragments already stored"),
    ("explain", "bench.explain",
     "PostgreSQL plans of every statement on the search and upload paths at N fragments"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: time our implementations against references, print a table and JSON",
        description=(
            "Benchmarks: each compares implementations side by side in one run, prints a table "
            "and a JSON report, and with --json PATH also writes the report there. "
            "`artalign bench NAME --help` says what NAME measures."
        ),
    )
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module_name, help_text in BENCHMARKS:
        module = importlib.import_module(module_name)
        parser = kinds.add_parser(
            name, help=help_text, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        parser.set_defaults(handler=module.main)
