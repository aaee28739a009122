"""Helpers for the curator-page tests: the real service in a subprocess, and Debian's Chromium.

The service is set up and started with its own commands: ``artalign demo --prepare-only``
synthesises a small collection, migrates a SQLite database and ingests it with the committed
demo model; ``artalign serve`` then serves it on a free localhost port. Nothing is stubbed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO / "demo"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

PREPARE_TIMEOUT_S = 600
READY_TIMEOUT_S = 180


@dataclass
class Service:
    url: str
    api_key: str
    collection: Path  # the synthetic collection the service was built from
    process: subprocess.Popen
    log_path: Path

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def has_demo_model() -> bool:
    """Whether the committed, trained demo model (demo/detector.pt, demo/scan.pt) is here."""
    return all((DEMO_MODELS / name).is_file() for name in ("detector.pt", "scan.pt"))


def start_service(workdir: Path, *, models: Path, n: int, seed: int, api_key: str) -> Service:
    """Prepare a demo collection of ``n`` artworks in ``workdir`` with the checkpoints in
    ``models`` (detector.pt, scan.pt), serve it, and wait for /readyz."""
    log_path = workdir / "service.log"
    cli = [sys.executable, "-m", "app"]
    with log_path.open("w") as log:
        prepared = subprocess.run(
            [*cli, "demo", "--collection", "synthetic", "--dir", str(workdir), "--n", str(n), "--seed", str(seed),
             "--models", str(models), "--prepare-only"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=PREPARE_TIMEOUT_S,
        )
    if prepared.returncode != 0:
        raise RuntimeError(f"artalign demo --prepare-only failed:\n{log_path.read_text()[-4000:]}")

    port = free_port()
    env = {
        **os.environ,
        "ARTALIGN_DATABASE_URL": f"sqlite:///{workdir / 'artalign.db'}",
        "ARTALIGN_DATA_DIR": str(workdir),
        "ARTALIGN_SCAN_CHECKPOINT": str(models / "scan.pt"),
        "ARTALIGN_DETECTOR_CHECKPOINT": str(models / "detector.pt"),
        "ARTALIGN_API_KEYS": json.dumps([api_key]),
        "ARTALIGN_DEVICE": "cpu",
    }
    return serve(env, port=port, api_key=api_key, collection=workdir / "collection", log_path=log_path)


def serve(env: dict[str, str], *, port: int, api_key: str, collection: Path, log_path: Path) -> Service:
    """`artalign serve` on ``port`` with the environment ``env`` (its settings), its output
    appended to ``log_path``; returns once /readyz answers ready (stopped if it never does)."""
    with log_path.open("a") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    service = Service(f"http://127.0.0.1:{port}", api_key, collection, process, log_path)
    try:
        wait_ready(service)
    except BaseException:
        stop_service(service)
        raise
    return service


def wait_ready(service: Service) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"artalign serve exited with status {service.process.returncode}:\n{service.log_tail()}"
            )
        try:
            with urllib.request.urlopen(service.url + "/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or not ready (503): ask again
        time.sleep(0.5)
    raise RuntimeError(f"{service.url}/readyz not ready after {READY_TIMEOUT_S} s:\n{service.log_tail()}")


def stop_service(service: Service) -> None:
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
        try:
            service.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
