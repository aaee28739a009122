"""Feature-store open, refresh, append and read cost against the shards written, before and
after a compaction.

    python -m bench.store [--shards 1000 10000 --rows 37 --dim 512 --json PATH]

For each count N: a fresh store gets N appends of one record each (the service appends one
shard per upload; ``--rows`` rows of ``--dim`` float16 features, as one artwork of the
compact detector), then, measured as the median of ``--repeats`` tries:

  open      ``FeatureStore(root)``: read the manifest and the log, check every shard named
  refresh   a reader's ``refresh()`` after another writer appended one record
  append    that writer's ``append`` (one shard, one log line, fsynced)
  read      ``features(rows)`` of 1,000 random rows, in a store opened afresh (maps shards)

then ``compact()`` (timed once) and the same four again; and, as the floor, the same four
in a store that got the same records in appends of 1,000 (as batch extraction writes): what
the keys alone cost. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import add_json_argument, publish, run_as_main

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10_000],
                        help="shards written before measuring (default %(default)s)")
    parser.add_argument("--rows", type=int, default=37, help="rows per record (default %(default)s)")
    parser.add_argument("--dim", type=int, default=512, help="feature size D_raw (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="tries per figure (default %(default)s)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the scratch stores go (default the system's temp folder)")
    add_json_argument(parser)


def _median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 2)


def measure(root: Path, options: argparse.Namespace, record: Any, first_key: int) -> dict[str, float]:
    """Open, refresh, append and read times of the store at ``root`` (the median ms)."""
    import numpy as np

    from index.featurestore import FeatureStore

    opens, refreshes, appends, reads = [], [], [], []
    writer, reader = FeatureStore(root), FeatureStore(root)
    rng = np.random.default_rng(0)
    for attempt in range(options.repeats):
        started = time.perf_counter()
        FeatureStore(root)
        opens.append(time.perf_counter() - started)
        started = time.perf_counter()
        writer.append(f"extra-{first_key + attempt}", record)
        appends.append(time.perf_counter() - started)
        started = time.perf_counter()
        reader.refresh()
        refreshes.append(time.perf_counter() - started)
        fresh = FeatureStore(root)
        rows = rng.integers(0, len(fresh), size=1000)
        started = time.perf_counter()
        fresh.features(rows)
        reads.append(time.perf_counter() - started)
    return {"shards": len(writer._view.shards), "open_ms": _median_ms(opens),
            "refresh_ms": _median_ms(refreshes), "append_ms": _median_ms(appends),
            "read_1000_rows_ms": _median_ms(reads)}


def run(options: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from tqdm import tqdm

    from index.featurestore import FeatureStore, RegionRecord

    rng = np.random.default_rng(0)
    record = RegionRecord(boxes=np.tile([0, 0, 10, 10], (options.rows, 1)),
                          scores=np.ones(options.rows), kinds=np.ones(options.rows),
                          features=rng.normal(size=(options.rows, options.dim)))
    results = []
    for count in options.shards:
        with tempfile.TemporaryDirectory(dir=options.dir) as folder:
            root = Path(folder) / "features"
            store = FeatureStore(root)
            for number in tqdm(range(count), desc=f"writing {count} shards", unit="shard"):
                store.append(f"artwork-{number}", record)
            before = measure(root, options, record, 0)
            started = time.perf_counter()
            FeatureStore(root).compact()
            compact_seconds = time.perf_counter() - started
            after = measure(root, options, record, options.repeats)
            batched_root = Path(folder) / "batched"
            batched = FeatureStore(batched_root)
            for start in range(0, count, 1000):
                batched.append_many((f"artwork-{number}", record)
                                    for number in range(start, min(count, start + 1000)))
            floor = measure(batched_root, options, record, 0)
            results.append({"written": count, "rows": len(store), "before": before, "after": after,
                            "batched": floor, "compact_seconds": round(compact_seconds, 2)})
            log.info("%s", results[-1])
    return {"benchmark": "store", "rows_per_record": options.rows, "dim": options.dim,
            "repeats": options.repeats, "results": results}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"feature store: one record ({report['rows_per_record']} rows, D={report['dim']}) "
             f"per shard, median of {report['repeats']}",
             f"{'written':>8} {'':<7} {'shards':>7} {'open ms':>9} {'refresh ms':>11} "
             f"{'append ms':>10} {'read ms':>8} {'compact s':>10}"]
    for result in report["results"]:
        for when in ("before", "after", "batched"):
            m = result[when]
            compact = f"{result['compact_seconds']:>10.2f}" if when == "after" else ""
            lines.append(f"{result['written']:>8,} {when:<7} {m['shards']:>7,} {m['open_ms']:>9.2f} "
                         f"{m['refresh_ms']:>11.2f} {m['append_ms']:>10.2f} "
                         f"{m['read_1000_rows_ms']:>8.2f} {compact}")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    if min(options.shards) < 1 or options.rows < 1 or options.dim < 1 or options.repeats < 1:
        raise ValueError("--shards, --rows, --dim and --repeats must be at least 1")
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.store", __doc__, add_arguments, main)
