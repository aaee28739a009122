"""`artalign bench ...`: benchmarks that compare implementations side by side."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from bench.scoring import add_arguments  # stdlib only at import: --help stays fast

    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: time our implementations against references, print a table and JSON",
        description="Benchmarks: each compares implementations side by side in one run.",
    )
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    scoring = kinds.add_parser(
        "scoring",
        help="cross-attention scoring: batched xattn_similarity vs a per-caption loop vs one matmul",
        description=(
            "Times models.scan.xattn_similarity against the reference implementation's "
            "per-caption loop and against the floor (one matrix product of all regions and "
            "all words), on random inputs, CPU, float32, both directions (t2i and i2t). "
            "Reports pairs/s, the speed-up over the loop, the time over the floor and the "
            "largest score difference from the loop."
        ),
    )
    add_arguments(scoring)
    scoring.set_defaults(handler=_scoring)


def _scoring(args: argparse.Namespace) -> int:
    from bench.scoring import main

    return main(args)
