"""`artalign demo`'s real collection: the committed demo/real/ catalogue imports, and the demo
preparation (import, migrate, extract, ingest, index) works on a handful of its images with
the committed models, reuses its work on a second start, starts afresh for another detector
and refuses a mismatched model pair.
Everything is read from the repository; nothing is downloaded."""

from __future__ import annotations

import csv
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest

from app.cli.serve import REAL_DEMO, import_real_demo, prepare_demo, restart_if_detector_changed
from tests.conftest import TinyCheckpoints

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / REAL_DEMO
# One object per kind, each easy to tell apart: a coin, a canopic jar, a cat figurine,
# a stela, a scarab and a shawabty.
HANDFUL = ("CHI_9680", "CLE_94079", "MET_544119", "MET_544776", "CLE_94365", "CLE_94222")


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_the_committed_catalogue_imports_whole_and_stays_small(tmp_path: Path) -> None:
    from collection.layout import Collection

    header, rows = read_rows(SOURCE / "metadata.csv")
    assert header == ["ID", "Source", "Title", "ObjectName", "Medium", "Period",
                      "Classification", "ImageURL"]  # the museums' own columns, licence source kept
    images = sorted((SOURCE / "images").iterdir())
    assert sorted(f"{row['ID']}.jpg" for row in rows) == [image.name for image in images]
    assert sum(image.stat().st_size for image in images) < 10 * 2**20
    assert all(row["ImageURL"].startswith("https://") and row["Source"] for row in rows)

    import_real_demo(tmp_path / "real")
    collection = Collection.load(tmp_path / "real")
    assert len(collection.artworks) == len(rows)  # no row dropped: no duplicate, no bad image
    titles = " ".join(artwork.title.lower() for artwork in collection.artworks)
    for word in ("canopic jar", "seated", "scarab", "amulet", "shabti", "shawabty", "stela",
                 "cat", "relief", "vessel"):
        assert titles.count(word) >= 3, word  # what a first-time visitor types finds something


@pytest.fixture
def handful(tmp_path: Path) -> Path:
    """A copy of demo/real/ with six of its objects: the same CSV columns and images."""
    header, rows = read_rows(SOURCE / "metadata.csv")
    kept = [row for row in rows if row["ID"] in HANDFUL]
    assert len(kept) == len(HANDFUL)
    folder = tmp_path / "source"
    (folder / "images").mkdir(parents=True)
    with open(folder / "metadata.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
    for row in kept:
        shutil.copyfile(SOURCE / "images" / f"{row['ID']}.jpg", folder / "images" / f"{row['ID']}.jpg")
    return folder


def prepare(root: Path, source: Path, detector: Path, scan: Path) -> int:
    return prepare_demo(collection=root / "collection", create=partial(import_real_demo, source=source),
                        database_url=f"sqlite:///{root / 'artalign.db'}", data_dir=root,
                        detector=detector, scan=scan, device="cpu")


def test_the_real_demo_prepares_searches_and_restarts_on_a_handful(
        tmp_path: Path, handful: Path, monkeypatch: pytest.MonkeyPatch,
        tiny_checkpoints: TinyCheckpoints) -> None:
    from app.db.session import create_db_engine, session_factory
    from app.services.retrieval import Engine
    from models.regions import IMAGENET_PACKAGE

    # The committed checkpoints hold every weight: no ImageNet package, no torch hub cache.
    monkeypatch.setitem(sys.modules, IMAGENET_PACKAGE, None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    root = tmp_path / "demo"
    detector, scan = SOURCE / "detector.pt", SOURCE / "scan.pt"
    assert prepare(root, handful, detector, scan) == len(HANDFUL)
    manifest = root / "index" / "fragments" / "manifest.json"
    built = manifest.read_bytes()

    assert prepare(root, handful, detector, scan) == len(HANDFUL)
    assert manifest.read_bytes() == built  # the second start reuses the indexes as they are

    database = create_db_engine(f"sqlite:///{root / 'artalign.db'}")
    try:
        engine = Engine.load(database=database, scan_checkpoint=scan, detector_checkpoint=detector,
                             data_dir=root, device="cpu")
        with session_factory(database)() as session:
            hits = engine.search_text(session, "coin", limit=50)
    finally:
        database.dispose()
    assert {hit.external_id for hit in hits} == set(HANDFUL)  # every object has fragments
    assert hits[0].external_id == "CHI_9680"  # the coin
    assert not (tmp_path / "torch-home").exists()  # nothing fetched

    restart_if_detector_changed(root, detector)
    assert manifest.read_bytes() == built  # same detector: kept
    restart_if_detector_changed(root, tiny_checkpoints.detector)
    assert not root.exists()  # features of another detector: the demo starts afresh


def test_a_scan_model_of_another_feature_size_is_refused(
        tmp_path: Path, handful: Path, tiny_checkpoints: TinyCheckpoints) -> None:
    from models.checkpoint import CheckpointError

    # the tiny detector extracts 32-d features; the committed SCAN reads the real detector's
    with pytest.raises(CheckpointError, match=r"scan\.pt reads \d+-d region features but .*"
                                              r"detector\.pt extracts 32-d ones: train the SCAN"):
        prepare(tmp_path / "demo", handful, tiny_checkpoints.detector, SOURCE / "scan.pt")
