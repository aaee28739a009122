"""`artalign extract --engine ray`: the same feature store as the local path, on a real local
Ray cluster, through a worker that dies mid-run and a run that fails and is rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from app.cli import main as cli_main
from collection.layout import Annotation, Artwork, Collection, CollectionWriter
from index.featurestore import FeatureStore
from models.regions import RegionExtractor
from training.extract import extract_collection

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'artalign[ray]'")

from training.ray_extract import (  # noqa: E402 (only once Ray is known to be there)
    DetectorSource,
    RayExtractionError,
    RayUnavailableError,
    RegionBatchExtractor,
    _check_reachable,
    extract_collection_ray,
)

pytestmark = pytest.mark.slow

N_ARTWORKS = 8
SIZE = (64, 48)  # one size for all: a batch pads nothing, so batching cannot change a feature


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Collection:
    """Eight drawn artworks (some annotated) and one file that is not an image."""
    root = tmp_path_factory.mktemp("ray") / "tiny"
    with CollectionWriter(root, name="tiny", source="test") as writer:
        for i in range(N_ARTWORKS):
            rng = np.random.default_rng(i)
            image = Image.fromarray(rng.integers(120, 240, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
            box = (4.0 + 3 * i, 6.0, 30.0 + 3 * i, 40.0)
            ImageDraw.Draw(image).ellipse(box, fill=(200, 30, 40))
            image.save(writer.root / "images" / f"a{i}.png")
            writer.add(_artwork(f"a{i}", [Annotation("red circle", box)] if i % 2 else []))
        (writer.root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        writer.add(_artwork("broken", []))
    return Collection.load(root)


def _artwork(artwork_id: str, annotations: list[Annotation]) -> Artwork:
    return Artwork(
        id=artwork_id, image=f"images/{artwork_id}.png", sha256=artwork_id.ljust(64, "0"),
        width=SIZE[0], height=SIZE[1], split="train", title=artwork_id,
        captions=["a red circle"], phrases=["red circle"], annotations=annotations,
    )


@pytest.fixture(scope="module")
def local_store(collection: Collection, tiny_checkpoints, tmp_path_factory) -> FeatureStore:
    """The reference: the local path's feature store for the same collection and detector."""
    extractor = RegionExtractor.from_checkpoint(tiny_checkpoints.detector)
    store = FeatureStore(tmp_path_factory.mktemp("local"), dim=extractor.feature_dim,
                         extractor=extractor.version)
    extract_collection(collection, extractor, store, batch_size=3, progress=False)
    return store


def ray_store(root: Path, tiny_checkpoints) -> FeatureStore:
    extractor = RegionExtractor.from_checkpoint(tiny_checkpoints.detector)
    return FeatureStore(root, dim=extractor.feature_dim, extractor=extractor.version)


def assert_same_as_local(store: FeatureStore, local: FeatureStore) -> None:
    """Every key once, with the local path's boxes, kinds and (float16) features."""
    manifest = json.loads((store.root / "manifest.json").read_text())
    logged = [json.loads(line) for line in (store.root / "manifest.log").read_text().splitlines()]
    keys = [key for shard in manifest["shards"] + logged for key in shard["keys"]]
    assert sorted(keys) == sorted(local.keys()) == [f"a{i}" for i in range(N_ARTWORKS)]
    assert len(store) == len(local)
    for key in local.keys():
        ours, theirs = store.get(key), local.get(key)
        np.testing.assert_array_equal(ours.kinds, theirs.kinds)
        np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-3)
        np.testing.assert_allclose(ours.scores, theirs.scores, atol=1e-5)
        assert ours.features.dtype == np.float16
        np.testing.assert_allclose(ours.features.astype(np.float32), theirs.features.astype(np.float32),
                                   rtol=1e-2, atol=1e-3)


def test_ray_writes_the_local_paths_features_and_reports_a_bad_image(
    ray_cluster, collection, local_store, tiny_checkpoints, tmp_path, capsys
):
    store = ray_store(tmp_path / "features", tiny_checkpoints)
    counts = extract_collection_ray(
        collection, DetectorSource(str(tiny_checkpoints.detector)), store,
        concurrency=1, batch_size=3, shard_records=4, progress=False,
    )
    assert counts["extracted"] == N_ARTWORKS and counts["unreadable"] == 1
    assert counts["rows"] == len(local_store)
    [failure] = counts["failures"]
    assert failure["id"] == "broken" and "broken.png" in failure["error"]
    assert_same_as_local(store, local_store)
    # Annotated artworks carry their ground-truth boxes (kind 2), as on the local path.
    assert (store.get("a1").kinds == 2).sum() == 1 and (store.get("a0").kinds == 2).sum() == 0

    # A rerun from the command line has nothing left to do but the unreadable image, and
    # writes no shard.
    manifest = (store.root / "manifest.json").read_text()
    argv = ["extract", "--collection", str(collection.root), "--detector", str(tiny_checkpoints.detector),
            "--out", str(store.root)]
    capsys.readouterr()
    assert cli_main([*argv, "--engine", "ray", "--concurrency", "1"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["extracted"] == 0 and again["already_present"] == N_ARTWORKS
    assert again["unreadable"] == 1 and again["failures"][0]["id"] == "broken"
    assert (store.root / "manifest.json").read_text() == manifest

    assert cli_main([*argv, "--address", "ray://nowhere:10001"]) == 2
    assert "only apply to --engine ray" in capsys.readouterr().err
    # Two actors would hold both CPUs and starve the decoding tasks: refused, not a hang.
    assert cli_main([*argv, "--engine", "ray", "--concurrency", "2"]) == 2
    assert "the Ray cluster has 2 CPUs; use at most 1 actors" in capsys.readouterr().err


def dying_extractor(marker: Path) -> type:
    """A RegionBatchExtractor whose worker process dies on the first batch it ever sees (once:
    ``marker`` remembers it across the restart)."""

    class DyingExtractor(RegionBatchExtractor):
        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(batch)

    return DyingExtractor


def failing_extractor(poison: str) -> type:
    """A RegionBatchExtractor that fails every batch holding the artwork ``poison``."""

    class FailingExtractor(RegionBatchExtractor):
        def __call__(self, batch):
            if poison in {str(k) for k in batch["key"]}:
                raise RuntimeError(f"detector failed on {poison}")
            return super().__call__(batch)

    return FailingExtractor


def test_a_failed_run_keeps_whole_records_and_a_rerun_through_a_killed_worker_completes(
    ray_cluster, collection, local_store, tiny_checkpoints, tmp_path
):
    store = ray_store(tmp_path / "features", tiny_checkpoints)
    detector = DetectorSource(str(tiny_checkpoints.detector))
    with pytest.raises(RayExtractionError, match="rerun the same command"):
        extract_collection_ray(
            collection, detector, store, concurrency=1, batch_size=2, shard_records=2,
            progress=False, batch_extractor=failing_extractor(f"a{N_ARTWORKS - 1}"),
        )
    # What the failed run committed is complete and readable; the poisoned artwork is not there.
    manifest = store.root / "manifest.json"
    done = FeatureStore(store.root).keys() if manifest.exists() else []
    assert f"a{N_ARTWORKS - 1}" not in done
    for key in done:
        assert len(FeatureStore(store.root).get(key)) == len(local_store.get(key))

    # The rerun's worker process dies on its first batch; Ray restarts it, retries the batch,
    # and the store still ends up with every artwork exactly once.
    marker = tmp_path / "died"
    counts = extract_collection_ray(
        collection, detector, FeatureStore(store.root), concurrency=1, batch_size=2,
        shard_records=2, progress=False, batch_extractor=dying_extractor(marker),
    )
    assert marker.exists(), "the worker did not die: the test did not test anything"
    assert counts["already_present"] == len(done)
    assert counts["extracted"] == N_ARTWORKS - len(done)
    assert_same_as_local(FeatureStore(store.root), local_store)


def test_a_wrong_address_fails_at_once_with_what_to_check():
    # Ray itself would retry connecting for minutes.
    with pytest.raises(RayUnavailableError, match="nothing answers at 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(RayUnavailableError, match="expected host:port"):
        _check_reachable("ray://head")
