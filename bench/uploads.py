"""Upload cost against the size of the collection, for `artalign bench http --stored N ...`.

For each size N: a scratch database (on the PostgreSQL server of ``--postgres``, created for
the run and dropped after; a SQLite file with ``--sqlite``) holding N fragments already
stored, with their feature store and saved indexes (:mod:`bench.fill`: bulk inserts, not the
API); then the real service (``artalign serve`` in a subprocess, real HTTP) started on it,
which loads the saved indexes (a rebuild would mean the fill is wrong: the run stops); then
``--warmup`` uploads, not timed, and ``--uploads`` uploads timed one after the other from
one client: ``POST /artworks`` of a real photograph from demo/real/images, cropped and
flipped at random so that each is new and goes through the detector, with its catalogue
title as caption. Every size uses the same images in the same order. Prints upload p50,
p95, max and throughput per size, how often the service saved its fragment index meanwhile
(its log: every upload before issue 16's change log, every snapshot since; the log is kept
as DIR/serve-N.log) and the ratio of the p95s, largest size over smallest (issue 16
asks for at most 1.5 between 1M and 10k).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "demo" / "real"  # metadata.csv (ID, Title, ...) and images/ID.jpg
P95_RATIO_BAR = 1.5


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--stored", type=int, nargs="+", default=None, metavar="N",
                       help="start the service itself on scratch collections of N fragments "
                            "each (e.g. 10000 1000000) and time --uploads uploads there, "
                            "instead of using --url")
    group.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                       metavar="URL", help="PostgreSQL server for the scratch databases (the URL "
                       "of any database there; default %(default)s)")
    group.add_argument("--sqlite", action="store_true",
                       help="use a scratch SQLite file instead of PostgreSQL")
    group.add_argument("--scan", type=Path, default=REPO / "demo" / "scan.pt",
                       help="SCAN checkpoint served (default demo/scan.pt: d 256, D_raw 512)")
    group.add_argument("--detector", type=Path, default=REPO / "demo" / "detector.pt",
                       help="detector checkpoint served (default demo/detector.pt)")
    group.add_argument("--threads", type=int, default=1,
                       help="torch and FAISS threads of the service (default %(default)s)")
    group.add_argument("--memory-budget", default="4GiB",
                       help="retrieval.memory_budget: picks the index kind (default %(default)s)")
    group.add_argument("--warmup", type=int, default=3,
                       help="uploads before the timed ones, per size (default %(default)s)")
    group.add_argument("--dir", type=Path, default=Path("var/bench-uploads"),
                       help="scratch folder for the data (removed after; default %(default)s)")
    group.add_argument("--start-timeout", type=float, default=900.0,
                       help="seconds the service may take to start (default %(default)s)")


def photos(count: int, seed: int) -> list[tuple[bytes, str]]:
    """``count`` new PNG images (crops of demo/real's photographs) with their titles."""
    from PIL import Image

    from bench.load import new_image

    with open(PHOTOS / "metadata.csv", encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if (PHOTOS / "images" / f"{r['ID']}.jpg").is_file()]
    if not rows:
        raise ValueError(f"{PHOTOS}: no photographs found (metadata.csv and images/ID.jpg)")
    rng = random.Random(seed)
    rng.shuffle(rows)
    made = []
    for i in range(count):
        row = rows[i % len(rows)]
        with Image.open(PHOTOS / "images" / f"{row['ID']}.jpg") as image:
            made.append((new_image(image.convert("RGB"), rng), row["Title"]))
    return made


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(database_url: str, data_dir: Path, options: argparse.Namespace, api_key: str,
                  log_path: Path) -> tuple[subprocess.Popen, str]:
    """``artalign serve`` on a free port; returns the process and its URL once /readyz says
    ready. Refuses (and stops it) when it starts rebuilding an index."""
    import httpx
    from sqlalchemy import create_engine, text

    port = free_port()
    env = {**os.environ, "ARTALIGN_DATABASE_URL": database_url, "ARTALIGN_DATA_DIR": str(data_dir),
           "ARTALIGN_SCAN_CHECKPOINT": str(options.scan.resolve()),
           "ARTALIGN_DETECTOR_CHECKPOINT": str(options.detector.resolve()),
           "ARTALIGN_API_KEYS": json.dumps([api_key]), "ARTALIGN_DEVICE": "cpu",
           "ARTALIGN_LIMITS__TORCH_THREADS": str(options.threads),
           "ARTALIGN_RETRIEVAL__MEMORY_BUDGET": str(options.memory_budget),
           "OMP_NUM_THREADS": str(options.threads), "PYTHONPATH": str(REPO)}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    database = create_engine(database_url)
    deadline = time.monotonic() + options.start_timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited ({process.returncode}) while starting: "
                                   f"{_tail(log_path)}")
            with database.connect() as connection:  # a rebuild records an index build
                if connection.execute(text("SELECT count(*) FROM index_builds")).scalar():
                    raise RuntimeError("the service is rebuilding its indexes: the filled "
                                       "manifests do not match the database (bench/fill.py)")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the service did not get ready in {options.start_timeout:.0f} s")
    except BaseException:
        stop_service(process)
        raise
    finally:
        database.dispose()


def stop_service(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


async def time_uploads(url: str, api_key: str, bodies: list[tuple[bytes, str]], warmup: int,
                       tag: str) -> Any:
    """The timed uploads (after ``warmup`` untimed ones), from one client."""
    import httpx

    from bench.load import load_requests

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        def upload(index: int) -> Any:
            image, title = bodies[index]
            document = {"external_id": f"{tag}-{index}", "title": title, "captions": [title]}
            return client.post("/artworks", headers={"X-API-Key": api_key},
                               data={"artwork": json.dumps(document)},
                               files={"image": (f"upload-{index}.png", image, "image/png")})

        for index in range(warmup):
            (await upload(index)).raise_for_status()

        def timed(index: int) -> Any:
            return upload(warmup + index)

        return await load_requests(client, "POST /artworks", len(bodies) - warmup, 1, timed,
                                   ok_status=(201,))


def measure_size(fragments: int, options: argparse.Namespace, bodies: list[tuple[bytes, str]]
                 ) -> dict[str, Any]:
    """Fill a scratch collection of ``fragments``, serve it, time the uploads; remove it."""
    import asyncio

    from pydantic import ByteSize, TypeAdapter

    from app.db.session import create_db_engine
    from bench.fill import fill, scratch_database

    budget = int(TypeAdapter(ByteSize).validate_python(options.memory_budget))
    data_dir = options.dir.resolve() / f"stored-{fragments}"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    try:
        with scratch_database(None if options.sqlite else options.postgres, data_dir) as url:
            database = create_db_engine(url)
            try:
                filled = fill(database, data_dir, fragments=fragments, scan=options.scan,
                              detector=options.detector, memory_budget=budget, seed=options.seed)
            finally:
                database.dispose()
            api_key = secrets.token_urlsafe(18)
            started = time.perf_counter()
            process, url_served = start_service(url, data_dir, options, api_key, data_dir / "serve.log")
            start_seconds = time.perf_counter() - started
            try:
                load = os.getloadavg()[0]
                window = [time.time()]
                result = asyncio.run(time_uploads(url_served, api_key, bodies, options.warmup,
                                                  f"bench-{fragments}"))
                window.append(time.time())
                load = max(load, os.getloadavg()[0])
            finally:
                stop_service(process)
            snapshots = index_saves(data_dir / "serve.log", *window)
            shutil.copyfile(data_dir / "serve.log", options.dir / f"serve-{fragments}.log")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if result.ok < result.requests:
        raise RuntimeError(f"{result.requests - result.ok} of {result.requests} uploads failed at "
                           f"{fragments} fragments stored")
    return {"stored_fragments": filled.fragments, "artworks": filled.artworks,
            "index_kind": filled.index_kind, "fill_seconds": filled.seconds,
            "start_seconds": round(start_seconds, 1), "load_average": round(load, 2),
            "index_saves": snapshots,
            **asdict(result)}


def index_saves(log_path: Path, start: float, end: float) -> int:
    """How many times the service saved its fragment index between ``start`` and ``end``
    (epoch seconds), from its log: once per upload before the change log, once per
    snapshot since."""
    from datetime import datetime

    saves = 0
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if " index of " in line and "vectors to " in line and line.rstrip().endswith("fragments"):
            try:
                moment = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            saves += start <= moment <= end
    return saves


def format_table(report: dict[str, Any]) -> str:
    header = (f"{'stored':>10}{'index':>9}{'uploads':>9}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
              f"{'up/s':>7}{'saves':>7}{'start s':>9}{'load':>6}")
    lines = [f"uploads (POST /artworks, one client) with fragments already stored; "
             f"{report['database']}, {report['threads']} thread(s), {report['cpus']} CPUs",
             header, "-" * len(header)]
    for r in report["sizes"]:
        lines.append(f"{r['stored_fragments']:>10,}{r['index_kind']:>9}{r['ok']:>9}{r['p50_ms']:>9.1f}"
                     f"{r['p95_ms']:>9.1f}{r['max_ms']:>9.1f}{r['throughput_rps']:>7.2f}"
                     f"{r['index_saves']:>7}{r['start_seconds']:>9.1f}{r['load_average']:>6.1f}")
    if "p95_ratio" in report:
        verdict = "meets" if report["p95_ratio"] <= P95_RATIO_BAR else "misses"
        lines.append(f"p95 ratio, largest / smallest: {report['p95_ratio']:.2f} ({verdict} the bar "
                     f"of {P95_RATIO_BAR}); throughput ratio {report['throughput_ratio']:.2f}")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Every size of ``--stored``, then the table and the JSON."""
    import logging

    from bench.report import publish

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    sizes = sorted(options.stored)
    if any(n < 1 for n in sizes):
        raise ValueError(f"--stored sizes must be at least 1, got {sizes}")
    if options.uploads < 1 or options.warmup < 0 or options.threads < 1:
        raise ValueError("--stored needs --uploads >= 1, --warmup >= 0 and --threads >= 1")
    for path in (options.scan, options.detector):
        if not path.is_file():
            raise ValueError(f"{path}: no such checkpoint (--scan, --detector)")
    bodies = photos(options.warmup + options.uploads, options.seed)
    results = [measure_size(n, options, bodies) for n in sizes]
    report = {"benchmark": "http-uploads", "database": "sqlite" if options.sqlite else "postgresql",
              "threads": options.threads, "cpus": os.cpu_count(), "scan": str(options.scan),
              "detector": str(options.detector), "warmup": options.warmup, "sizes": results}
    if len(results) > 1:
        small, large = results[0], results[-1]
        report["p95_ratio"] = round(large["p95_ms"] / small["p95_ms"], 3)
        report["throughput_ratio"] = round(large["throughput_rps"] / small["throughput_rps"], 3)
    publish(report, format_table(report), options.json)
    return 0
