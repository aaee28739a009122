"""Training speed, CPU against GPU side by side: detector steps and SCAN steps.

    python -m bench.training [--collection var/byzart] [--steps 10] [--batch-size 8]
                             [--detectors mobilenet_v2_fpn@384 ...] [--scan-batch 128]
                             [--threads 1] [--json PATH]

A detector row times ``train-detector``'s step (forward with targets, backward, clip, AdamW)
on the first annotated train images of --collection (random weights: the speed does not
depend on them). A SCAN row times ``train``'s step on random region features of the shape
real ones have (--scan-batch pairs, 37 regions of D_raw 1792, 8-word phrases, the demo
preset's sizes with the GRU text side). Each setup runs 2 warm-up steps, then --steps timed
ones, on the CPU and, where torch sees one, on the GPU. Reported: ms per step, items per
second and, per setup, the GPU's speed over the CPU's. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import add_json_argument, publish, require_positive, run_as_main

log = logging.getLogger(__name__)

WARMUP_STEPS = 2
SCAN_REGIONS, SCAN_RAW_DIM, SCAN_WORDS, SCAN_VOCAB = 37, 1792, 8, 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=Path("var/byzart"),
                        help="annotated collection whose train images the detector rows use "
                             "(default %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setup (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per detector step (default %(default)s, as train-detector)")
    parser.add_argument("--detectors", nargs="*", default=["compact_fpn@384", "mobilenet_v2_fpn@384"],
                        metavar="BACKBONE@SIZE", help="detector setups (default %(default)s)")
    parser.add_argument("--scan-batch", type=int, default=128,
                        help="pairs per SCAN step (default %(default)s, as train); 0 leaves SCAN out")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings steady on a shared machine (default %(default)s)")
    add_json_argument(parser)


def run(options: argparse.Namespace) -> dict[str, Any]:
    import torch

    require_positive(options, "steps", "batch_size")
    torch.set_num_threads(options.threads)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    setups: list[tuple[str, str, Callable[[str], Callable[[], None]]]] = []
    if options.detectors:
        batch = _detector_batch(options.collection, options.batch_size)
        for setup in options.detectors:
            setups.append((setup, "images", lambda device, setup=setup: _detector_step(setup, *batch, device)))
    if options.scan_batch:
        setups.append((f"scan b{options.scan_batch}", "pairs",
                       lambda device: _scan_step(options.scan_batch, device)))
    load_before = os.getloadavg()[0]
    rows = []
    for name, unit, make in setups:
        cpu_ms = None
        for device in devices:
            ms = _time_steps(make(device), options.steps, device)
            items = options.batch_size if unit == "images" else options.scan_batch
            cpu_ms = ms if device == "cpu" else cpu_ms
            rows.append({"setup": name, "device": device, "ms_per_step": round(ms, 1),
                         "items_per_s": round(1000 * items / ms, 1),
                         "unit": unit, "speed_vs_cpu": round(cpu_ms / ms, 2)})
            log.info("%s on %s: %.1f ms per step", name, device, ms)
    return {
        "benchmark": "training",
        "steps": options.steps,
        "batch_size": options.batch_size,
        "scan_batch": options.scan_batch,
        "threads": options.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
                    "torch": torch.__version__,
                    "load_average_before": round(load_before, 2),
                    "load_average_after": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }


def _time_steps(step: Callable[[], None], steps: int, device: str) -> float:
    """Mean milliseconds of one ``step()`` after the warm-up ones."""
    import torch

    for _ in range(WARMUP_STEPS):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / steps


def _detector_batch(root: Path, batch_size: int) -> tuple[Any, list[Any]]:
    """(collection, its first ``batch_size`` annotated train artworks): the batch every
    detector row trains on, resized to each setup's size in _detector_step."""
    from collection.layout import Collection

    collection = Collection.load(root)
    artworks = [a for a in collection.split("train") if a.annotations][:batch_size]
    if len(artworks) < batch_size:
        raise ValueError(f"{root}: needs {batch_size} annotated train images, has {len(artworks)}")
    return collection, artworks


def _detector_step(setup: str, collection: Any, artworks: list[Any], device: str) -> Callable[[], None]:
    import torch

    from models.regions import DetectorConfig, build_detector
    from training.detector import DetectionDataset

    backbone, _, size = setup.partition("@")
    config = DetectorConfig(backbone=backbone, image_size=int(size or 256))
    torch.manual_seed(0)
    model = build_detector(config).to(device).train()
    dataset = DetectionDataset(collection, artworks, config, augment=False)
    batch = [dataset[i] for i in range(len(dataset))]
    images = [s.image.to(device) for s in batch]
    targets = [{k: v.to(device) for k, v in dataset.target(s).items()} for s in batch]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    return step


def _scan_step(batch: int, device: str) -> Callable[[], None]:
    import torch

    from models.scan import SCAN, ScanConfig

    torch.manual_seed(0)
    config = ScanConfig(vocab_size=SCAN_VOCAB, raw_dim=SCAN_RAW_DIM, embed_dim=256, word_dim=128,
                        direction="both", agg="mean")
    model = SCAN(config).to(device).train()
    raw = torch.randn(batch, SCAN_REGIONS, SCAN_RAW_DIM, device=device)
    raw_lens = torch.full((batch,), SCAN_REGIONS, device=device)
    ids = torch.randint(1, SCAN_VOCAB, (batch, SCAN_WORDS), device=device)
    word_lens = torch.randint(2, SCAN_WORDS + 1, (batch,), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)

    def step() -> None:
        losses = model(raw, raw_lens, ids, word_lens)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    return step


def format_table(report: dict[str, Any]) -> str:
    header = f"{'setup':28} {'device':6} {'ms/step':>9} {'items/s':>9} {'unit':>7} {'vs CPU':>7}"
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        lines.append(f"{row['setup']:28} {row['device']:6} {row['ms_per_step']:9.1f} {row['items_per_s']:9.1f} "
                     f"{row['unit']:>7} {row['speed_vs_cpu']:7.2f}")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.training", __doc__, add_arguments, main)
