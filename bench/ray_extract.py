"""Region extraction throughput: the local path (`artalign extract`) against the Ray path
(`artalign extract --engine ray`), same images, same detector, side by side in one run.

The images are the first ``--images`` of the real collection (shared/data/egyptian-cc0,
224x224 JPEGs) when it is there, else generated ones; the detector is ``--detector`` or a
randomly initialised one with the default config (compact_fpn at 256 px: random weights do
the same arithmetic as trained ones). Each run extracts every image into its own feature
store: the local path with torch's threads (``local``) and with one thread (``local-1t``, what
one Ray actor holding one CPU gets), then the Ray path per ``--concurrency``. The Ray runs
include starting their actors (importing torch, loading the detector) but not starting the
local Ray cluster, which is reported apart. Also reported: the largest feature difference
between the engines, and the per-image figures docs/SCALING.md scales up: rows and bytes per
image in the feature store, CPU seconds per megapixel to decode full-size images, the rate
of one writer appending shards, and (with ``--postgres``) bytes per artwork in PostgreSQL.

    python -m bench.ray_extract [--images 64 --batch-size 8 --concurrency 1 --json out.json]
                                [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

Heavy libraries are imported inside the functions so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import add_json_argument, publish, run_as_main

if TYPE_CHECKING:
    from collections.abc import Callable

    from collection.layout import Collection
    from index.featurestore import FeatureStore

    # measure(engine name, extract into a store) -> the store it filled
    Measure = Callable[[str, Callable[[FeatureStore], dict[str, int]]], FeatureStore]

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/egyptian-cc0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=64, help="images to extract (default 64)")
    parser.add_argument("--source", type=Path, default=DATA_DIR / "images",
                        help="folder of images to take them from (default: the egyptian-cc0 "
                             "images; generated images when the folder is absent)")
    parser.add_argument("--detector", type=Path, default=None,
                        help="detector checkpoint (default: a random compact_fpn, default config)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--concurrency", default="1",
                        help="Ray detector actors, one run per comma-separated value; each takes a "
                             "CPU and decoding needs one more (default 1)")
    parser.add_argument("--large-source", type=Path, default=DATA_DIR / "images-large",
                        help="folder of full-size images whose decoding cost per megapixel is "
                             "measured (default: egyptian-cc0 images-large; skipped when absent)")
    parser.add_argument("--postgres", metavar="URL", default=None,
                        help="also measure bytes per artwork in PostgreSQL: a server URL such as "
                             "postgresql://postgres@127.0.0.1:5432/postgres (a scratch database "
                             "is created there and dropped)")
    add_json_argument(parser)


def make_collection(root: Path, source: Path, count: int) -> tuple[Any, str]:
    """A collection of ``count`` images from ``source`` (sorted by name), or generated ones."""
    import io

    import numpy as np
    from PIL import Image

    from collection.layout import Artwork, Collection, CollectionWriter, sha256_of

    files = sorted(p for p in source.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count] \
        if source.is_dir() else []
    origin = str(source) if files else "generated 224x224 noise"
    with CollectionWriter(root, name="bench", source=origin) as writer:
        for i in range(count):
            if files:
                data = files[i % len(files)].read_bytes()
                suffix = files[i % len(files)].suffix.lower()
            else:
                pixels = np.random.default_rng(i).integers(0, 256, (224, 224, 3), dtype=np.uint8)
                out = io.BytesIO()
                Image.fromarray(pixels).save(out, format="PNG")
                data, suffix = out.getvalue(), ".png"
            name = f"images/bench-{i:05d}{suffix}"
            (writer.root / name).write_bytes(data)
            width, height = Image.open(io.BytesIO(data)).size
            writer.add(Artwork(id=f"bench-{i:05d}", image=name, sha256=sha256_of(data), width=width,
                               height=height, split="train", title=f"bench {i}"))
    return Collection.load(root), origin


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def decoding_cost(folder: Path, count: int = 60) -> dict[str, Any] | None:
    """CPU seconds per megapixel to decode, validate and resize full-size images, as the
    decoding tasks and the extractor do before detection."""
    from collection.images import load_image
    from models.regions import DetectorConfig, resize_for_detection

    files = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    if not files:
        log.info("no images in %s: decoding cost not measured", folder)
        return None
    megapixels, start = 0.0, time.process_time()
    for path in files:
        image = load_image(path)
        megapixels += image.size[0] * image.size[1] / 1e6
        resize_for_detection(image, DetectorConfig().image_size)
    seconds = time.process_time() - start
    return {"images": len(files), "mean_megapixels": megapixels / len(files),
            "cpu_seconds_per_megapixel": seconds / megapixels}


def store_append_rate(root: Path, dim: int, rows: int, shards: int = 20, per_shard: int = 256) -> dict[str, Any]:
    """One writer appending ``shards`` shards of ``per_shard`` records of ``rows`` rows, as the
    driver of the Ray path does: images/s, MB/s and the manifest's bytes per key."""
    import numpy as np

    from index.featurestore import FeatureStore, RegionRecord

    rng = np.random.default_rng(0)
    store = FeatureStore(root, dim=dim)
    start = time.perf_counter()
    for shard in range(shards):
        store.append_many(
            (f"k{shard}-{i}", RegionRecord(rng.random((rows, 4)) * 100, rng.random(rows),
                                           rng.random((rows, dim), dtype=np.float32), np.ones(rows)))
            for i in range(per_shard)
        )
    seconds = time.perf_counter() - start
    images = shards * per_shard
    return {"images": images, "images_per_second": images / seconds,
            "megabytes_per_second": store_bytes(root) / 1e6 / seconds,
            # the key maps live in manifest.json and, since its last rewrite, manifest.log
            "manifest_bytes_per_key": sum((root / name).stat().st_size for name in ("manifest.json", "manifest.log")
                                          if (root / name).exists()) / images}


def postgres_bytes(server_url: str, rows: int, artworks: int = 2000) -> dict[str, Any]:
    """Bytes per artwork, per table (indexes included), in a scratch database migrated to head
    and filled with ``artworks`` artworks of 3 captions, ``rows`` regions and ``rows`` fragments."""
    import random

    from sqlalchemy import create_engine, insert, text

    from app.db import models
    from bench.fill import scratch_database

    rng = random.Random(0)
    with scratch_database(server_url, Path(tempfile.gettempdir())) as url:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(insert(models.Artwork), [dict(
                id=a + 1, external_id=f"museum-{a:08d}", title="Statuette of a seated scribe",
                meta={"source": "a museum", "classification": "Sculpture", "period": "Late Period"},
                image_location=f"images/museum-{a:08d}.jpg", image_sha256=f"{a:064x}",
                content_sha256=f"{a + 1:064x}", width=3000, height=4000, split="train",
            ) for a in range(artworks)])
            connection.execute(insert(models.Caption), [dict(
                artwork_id=a + 1, position=p,
                text="A limestone statuette of a seated scribe with a papyrus roll open on his lap.",
            ) for a in range(artworks) for p in range(3)])
            regions, fragments = [], []
            for a in range(artworks):
                first = a * rows
                for row in range(first, first + rows):
                    x, y = rng.uniform(0, 2000), rng.uniform(0, 3000)
                    box = dict(artwork_id=a + 1, x1=x, y1=y, x2=x + 500, y2=y + 600)
                    regions.append(dict(box, store_row=row, score=rng.random(), kind=int(row > first)))
                    members = (list(range(first, first + rows)) if row == first
                               else [row, *rng.sample(range(first + 1, first + rows), min(8, rows - 1))])
                    fragments.append(dict(box, source="whole" if row == first else "extracted",
                                          region_rows=members))
            connection.execute(insert(models.Region), regions)
            connection.execute(insert(models.Fragment), fragments)
            connection.exec_driver_sql("VACUUM ANALYZE")
            per_table = {
                table: connection.execute(text(f"SELECT pg_total_relation_size('{table}')")).scalar() / artworks
                for table in ("artworks", "captions", "regions", "fragments")
            }
        engine.dispose()
    return {"artworks": artworks, "rows_per_artwork": rows, "bytes_per_artwork": per_table,
            "total_bytes_per_artwork": sum(per_table.values())}


def run(options: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    from index.featurestore import FeatureStore
    from models.regions import RegionExtractor
    from training.extract import extract_collection

    with tempfile.TemporaryDirectory(prefix="bench-ray-extract-") as scratch:
        scratch = Path(scratch)
        collection, origin = make_collection(scratch / "collection", options.source, options.images)
        detector = options.detector or _random_detector(scratch / "detector.pt")
        extractor = RegionExtractor.from_checkpoint(detector)
        report: dict[str, Any] = {
            "benchmark": "ray_extract",
            "images": options.images, "source": origin, "batch_size": options.batch_size,
            "detector": {**{k: extractor.config.to_dict()[k] for k in ("backbone", "image_size", "top_k")},
                         "feature_dim": extractor.feature_dim, "random": options.detector is None},
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "ray": ray.__version__,
                        "cpu": platform.processor() or platform.machine(), "load_before": os.getloadavg()},
            "runs": [],
        }

        def measure(engine: str, extract: Any) -> FeatureStore:
            store = FeatureStore(scratch / engine, dim=extractor.feature_dim, extractor=extractor.version)
            start, cpu_start = time.perf_counter(), time.process_time()
            counts = extract(store)
            seconds = time.perf_counter() - start
            report["runs"].append({
                "engine": engine, "seconds": seconds, "images_per_second": options.images / seconds,
                # CPU time of this process (all its threads): for the local path, the cost per
                # image whatever else the machine runs; the Ray path works in other processes.
                "driver_cpu_seconds_per_image": (time.process_time() - cpu_start) / options.images,
                "rows": counts["rows"], "store_bytes": store_bytes(store.root),
            })
            log.info("%s: %d images in %.1f s (%.2f images/s)", engine, options.images, seconds,
                     options.images / seconds)
            return store

        local = measure("local", lambda store: extract_collection(
            collection, extractor, store, batch_size=options.batch_size, progress=False))
        # Once more on one torch thread, as each Ray actor that holds one CPU runs: the per-core
        # cost, and a fair match for ray-1 on a machine that other work keeps busy.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            measure("local-1t", lambda store: extract_collection(
                collection, extractor, store, batch_size=options.batch_size, progress=False))
        finally:
            torch.set_num_threads(threads)

        _ray_runs(options, report, measure, collection, detector, local)
        _per_image_figures(options, report, scratch, extractor.feature_dim)
    return report


def _random_detector(path: Path) -> Path:
    """A randomly initialised default detector (its speed is a trained one's)."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.regions import DetectorConfig, build_detector

    torch.manual_seed(0)
    config = DetectorConfig()
    save_checkpoint(path, kind="detector", config=config.to_dict(),
                    state_dict=build_detector(config).state_dict())
    return path


def _ray_runs(options: argparse.Namespace, report: dict[str, Any], measure: Measure,
              collection: Collection, detector: Path, local: FeatureStore) -> None:
    """Extraction through Ray at each concurrency, each checked against the local features."""
    import numpy as np
    import ray

    from training.ray_extract import DetectorSource, extract_collection_ray

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    report["ray_init_seconds"] = time.perf_counter() - start
    try:
        for concurrency in [int(v) for v in options.concurrency.split(",") if v.strip()]:
            remote = measure(f"ray-{concurrency}", lambda store, c=concurrency: extract_collection_ray(
                collection, DetectorSource(str(detector)), store, concurrency=c,
                batch_size=options.batch_size, progress=False))
            report["runs"][-1]["max_abs_feature_diff_vs_local"] = max(
                float(np.abs(remote.get(k).features.astype(np.float32)
                             - local.get(k).features.astype(np.float32)).max())
                for k in local.keys()
            )
    finally:
        ray.shutdown()


def _per_image_figures(options: argparse.Namespace, report: dict[str, Any], scratch: Path,
                       feature_dim: int) -> None:
    """Rows and bytes per image, decoding and append costs: what docs/SCALING.md scales up."""
    rows = report["runs"][0]["rows"]
    report["rows_per_image"] = rows / options.images
    report["store_bytes_per_image"] = report["runs"][0]["store_bytes"] / options.images
    report["store_bytes_per_row"] = report["runs"][0]["store_bytes"] / rows
    rows_per_image = round(report["rows_per_image"])
    report["decoding"] = decoding_cost(options.large_source)
    report["store_append"] = store_append_rate(scratch / "append", feature_dim, rows_per_image)
    if options.postgres:
        report["postgres"] = postgres_bytes(options.postgres, rows_per_image)
    report["machine"]["load_after"] = os.getloadavg()


def format_table(report: dict[str, Any]) -> str:
    local = report["runs"][0]["seconds"]
    detector = report["detector"]
    lines = [
        f"{report['images']} images ({report['source']}), {detector['backbone']} at "
        f"{detector['image_size']} px, D_raw={detector['feature_dim']}, batch {report['batch_size']}, "
        f"{report['machine']['cpus']} CPUs (load {report['machine']['load_before'][0]:.1f}); "
        f"Ray cluster start {report['ray_init_seconds']:.1f} s (not counted)",
        f"{'engine':<9} {'seconds':>8} {'images/s':>9} {'vs local':>9} {'driver CPU s/img':>17} "
        f"{'max|diff|':>10}",
    ]
    for run in report["runs"]:
        diff = run.get("max_abs_feature_diff_vs_local")
        lines.append(f"{run['engine']:<9} {run['seconds']:>8.1f} {run['images_per_second']:>9.2f} "
                     f"{local / run['seconds']:>8.2f}x {run['driver_cpu_seconds_per_image']:>17.3f} "
                     f"{'' if diff is None else f'{diff:.1e}':>10}")
    lines.append(f"{report['rows_per_image']:.1f} rows/image, {report['store_bytes_per_row']:.0f} bytes/row, "
                 f"{report['store_bytes_per_image'] / 1024:.1f} KiB/image in the feature store")
    if report["decoding"]:
        decoding = report["decoding"]
        lines.append(f"decoding + resizing: {decoding['cpu_seconds_per_megapixel']:.4f} CPU-s/megapixel "
                     f"({decoding['images']} images of {decoding['mean_megapixels']:.2f} MP)")
    append = report["store_append"]
    lines.append(f"feature-store append, one writer: {append['images_per_second']:,.0f} images/s, "
                 f"{append['megabytes_per_second']:.0f} MB/s, manifest {append['manifest_bytes_per_key']:.1f} B/key")
    if "postgres" in report:
        postgres = report["postgres"]
        tables = ", ".join(f"{t} {b:,.0f}" for t, b in postgres["bytes_per_artwork"].items())
        lines.append(f"PostgreSQL: {postgres['total_bytes_per_artwork']:,.0f} B/artwork ({tables})")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    if options.images < 1 or options.batch_size < 1:
        raise ValueError("--images and --batch-size must be at least 1")
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.ray_extract", __doc__, add_arguments, main)
