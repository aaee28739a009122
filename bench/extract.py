"""Region-extraction throughput per backbone, side by side, on the same images.

    python -m bench.extract [--collection var/synth-2000] [--images 32] [--json PATH]
                            [--detector var/detector.pt ...] [--setups compact_fpn@256 ...]

Each setup is ``backbone@image_size``, built with random weights (throughput does not depend
on the weights: the same proposals are pooled and the same NMS runs), or ``--detector`` (may
repeat) for a trained checkpoint. Every setup extracts the same ``--images`` images through
:meth:`RegionExtractor.extract` (whole image + top-k regions + features) after one warm-up
batch, on the CPU and, where there is one, again on the GPU. Reported: parameters, D_raw,
images/s, ms/image, the ratio to the first setup, and the load average before and after (the
CPU numbers are only comparable on an otherwise idle machine). Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.report import add_json_argument, publish, run_as_main

log = logging.getLogger(__name__)

DEFAULT_SETUPS = [
    "compact_fpn@256",
    "compact_fpn@384",
    "mobilenet_v2_fpn@384",
    "mobilenet_v3_large_320_fpn@320",
    "mobilenet_v3_large_fpn@256",
    "resnet50_fpn_v2@256",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=Path("var/synth-2000"),
                        help="take the first images of this collection (default %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="images timed per setup (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default %(default)s)")
    parser.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, metavar="BACKBONE@SIZE",
                        help="backbones with random weights at an image size (default %(default)s)")
    parser.add_argument("--detector", type=Path, action="append", default=[],
                        help="also time this trained detector checkpoint (may repeat)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 keeps timings steady on a shared machine (default %(default)s)")
    add_json_argument(parser)


def run(options: argparse.Namespace) -> dict[str, Any]:
    import torch

    from collection.images import load_image
    from collection.layout import Collection

    torch.set_num_threads(options.threads)
    collection = Collection.load(options.collection)
    artworks = [a for a in collection.artworks if a.image is not None][: options.images + options.batch_size]
    images = [load_image(collection.image_path(a)) for a in artworks]
    warmup, timed = images[: options.batch_size], images[options.batch_size :]
    if not timed:
        raise ValueError(f"{options.collection}: needs more than {options.batch_size} images")
    load_before = os.getloadavg()[0]
    rows = [_time_extractor(name, make, warmup, timed, options.batch_size)
            for name, make in _extractors(options)]
    for row in rows:
        row["speed_vs_first"] = round(row["images_per_s"] / rows[0]["images_per_s"], 2)
    return {
        "benchmark": "extract",
        "images": len(timed),
        "batch_size": options.batch_size,
        "threads": options.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": round(load_before, 2),
                    "load_average_after": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }


def _extractors(options: argparse.Namespace) -> list[tuple[str, Any]]:
    """(name, factory) of each extractor to time: the trained checkpoints, then the untrained
    setups, on the CPU and, where there is one, on the GPU."""
    import torch

    from models.regions import DetectorConfig, RegionExtractor, build_detector

    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    extractors: list[tuple[str, Any]] = []
    for device in devices:
        for path in options.detector:
            extractors.append((f"trained {path.name} {device}",
                               lambda path=path, device=device: RegionExtractor.from_checkpoint(path, device)))
        for setup in options.setups:
            backbone, _, size = setup.partition("@")
            config = DetectorConfig(backbone=backbone, image_size=int(size or 256))
            extractors.append((f"{setup} {device}", lambda config=config, device=device: RegionExtractor(
                build_detector(config), config, version="bench", device=device)))
    return extractors


def _time_extractor(name: str, make: Any, warmup: list, timed: list, batch_size: int) -> dict[str, Any]:
    """One row of the table: images/s of ``make()`` over ``timed``, after one warm-up batch."""
    import torch

    torch.manual_seed(0)
    extractor = make()
    extractor.extract(warmup)
    regions = 0
    started = time.perf_counter()
    for start in range(0, len(timed), batch_size):
        records = extractor.extract(timed[start : start + batch_size])
        regions += sum(len(r) for r in records)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    log.info("%s: %.2f images/s", name, len(timed) / seconds)
    return {
        "setup": name,
        "device": extractor.device.type,
        "backbone": extractor.config.backbone,
        "image_size": extractor.config.image_size,
        "params_m": round(sum(p.numel() for p in extractor.model.parameters()) / 1e6, 2),
        "d_raw": extractor.feature_dim,
        "images_per_s": round(len(timed) / seconds, 2),
        "ms_per_image": round(1000 * seconds / len(timed), 1),
        "regions_per_image": round(regions / len(timed), 1),
    }


def format_table(report: dict[str, Any]) -> str:
    header = f"{'setup':40} {'params M':>8} {'D_raw':>6} {'img/s':>7} {'ms/img':>8} {'regions':>8} {'vs first':>8}"
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        lines.append(
            f"{row['setup']:40} {row['params_m']:8.2f} {row['d_raw']:6d} {row['images_per_s']:7.2f} "
            f"{row['ms_per_image']:8.1f} {row['regions_per_image']:8.1f} {row['speed_vs_first']:8.2f}"
        )
    machine = report["machine"]
    lines.append(
        f"{report['images']} images, batch {report['batch_size']}, {report['threads']} thread(s), "
        f"{machine['cpus']} CPUs, load average {machine['load_average_before']} -> {machine['load_average_after']}"
    )
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    if options.images < 1 or options.batch_size < 1:
        raise ValueError("--images and --batch-size must be at least 1")
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.extract", __doc__, add_arguments, main)
