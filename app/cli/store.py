"""`artalign store compact`: merge the feature store's small shards into large ones."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    store = subparsers.add_parser(
        "store", help="maintain the feature store (raw region features under DATA_DIR/features)",
        description="The feature store holds the region extractor's raw features, one shard "
                    "per append (the service appends one per upload).",
    )
    commands = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    compact = commands.add_parser(
        "compact", help="merge runs of small shards into large ones",
        description="Merge each run of consecutive shards smaller than --target-rows into "
                    "shards of at most --target-rows rows, so that opening the store and "
                    "picking up another process's appends stay cheap however many uploads "
                    "came before. Row numbers and keys do not change; safe while the service "
                    "runs and appends (readers switch to the merged shards on their own); a "
                    "crash leaves the old state or the new one.",
    )
    compact.add_argument("--data-dir", type=Path,
                         help="holds features/ (default $ARTALIGN_DATA_DIR or var)")
    compact.add_argument("--target-rows", type=int, default=None,
                         help="rows of a merged shard (default 65,536: 64 MiB at D_raw 512)")
    compact.set_defaults(handler=run_compact)


def run_compact(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from app.settings import Settings
    from index.featurestore import COMPACT_ROWS, FeatureStore

    root = (args.data_dir or Settings().data_dir) / "features"
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"{root}: no feature store here (pass --data-dir)")
    store = FeatureStore(root)
    with tqdm(desc="merging shards", unit="shard") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        before, after = store.compact(target_rows=args.target_rows or COMPACT_ROWS, progress=progress)
    print(f"{root}: {before} shards -> {after}, {len(store):,} rows, {len(store.keys()):,} keys")
    return 0
