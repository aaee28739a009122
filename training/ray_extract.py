"""Region extraction over a whole collection on a Ray cluster (Ray Data): `artalign extract
--engine ray`.

The same work as the local path (``training.extract.extract_collection``) and the same result:
the feature store gets, per artwork (key = artwork id), the whole image, the top-k detected
regions and the artwork's annotation boxes, as float16 rows. The pipeline::

    driver   artworks not yet in the store ──► ray.data.from_items (resumable: a rerun skips them)
    tasks    read + decode + validate each image (collection.images.load_image); a bad image
             becomes a row with an error message, never a failed job
    actors   RegionBatchExtractor: loads the detector once, runs RegionExtractor.extract on a
             batch of decoded images (one GPU per actor when the cluster has GPUs)
    driver   FeatureStore.append_many per shard of records: a new shard folder, then one
             fsynced manifest-log line, so a killed worker, node or driver loses at most the records
             not yet committed, and a rerun completes them without duplicates

Records travel to the driver through Ray's object store (float16, ~2 KiB per region at
D_raw = 1024); only the driver writes the store, so the store needs no shared file system,
only the collection's images and the detector file do (the same path on every node).

Ray is an optional dependency (``pip install 'artalign[ray]'``): nothing on the local path
imports this module, and ``ray`` itself is imported inside the functions that use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from training.extract import (
    SHARD_RECORDS,
    annotation_boxes,
    append_shard,
    artworks_to_extract,
    log_store,
)

if TYPE_CHECKING:
    from collection.layout import Artwork, Collection
    from index.featurestore import FeatureStore, RegionRecord
    from models.regions import RegionExtractor

log = logging.getLogger(__name__)

# Ray Data restarts a dead actor and retries its task forever by default: one image that
# crashes the detector (out of memory, a segfault in a kernel) would then loop forever.
# A few restarts ride out a lost node; after that the run fails and a rerun resumes.
ACTOR_RESTARTS = 3


class RayUnavailableError(ValueError):
    """``--engine ray`` without Ray installed, or a cluster that cannot be reached."""


class RayExtractionError(RuntimeError):
    """The Ray job failed (a worker kept dying); what was committed stays, a rerun resumes."""


@dataclass(frozen=True)
class DetectorSource:
    """Where each actor loads the detector from: an artalign detector checkpoint, or with
    ``torchvision_backbone`` a torchvision Faster R-CNN state dict (as `artalign extract`)."""

    path: str
    torchvision_backbone: str | None = None

    def load(self, device: str = "cpu") -> RegionExtractor:
        from models.regions import RegionExtractor

        if self.torchvision_backbone:
            return RegionExtractor.from_torchvision_weights(self.torchvision_backbone, self.path, device)
        return RegionExtractor.from_checkpoint(self.path, device)


def decode_artwork(row: dict[str, Any]) -> dict[str, Any]:
    """Ray task: read and validate one image. Adds ``pixels`` ((H, W, 3) uint8, (0, 0, 3) when
    unusable) and ``error`` (the reason, '' when fine); drops ``path``."""
    from collection.images import ImageError, load_image

    try:
        pixels = np.asarray(load_image(row["path"]), dtype=np.uint8)
        error = ""
    except ImageError as exc:
        pixels, error = np.zeros((0, 0, 3), dtype=np.uint8), str(exc)
    return {"key": row["key"], "extra_boxes": row["extra_boxes"], "pixels": pixels, "error": error}


class RegionBatchExtractor:
    """Ray Data callable class: one per actor, so the detector is loaded once per actor.

    Takes a batch of decoded rows and returns one row per input row with the record's
    arrays (``boxes``, ``scores``, ``features`` as float16, ``kinds``), empty for a row whose
    image could not be decoded (its ``error`` is passed through).
    """

    def __init__(self, detector: DetectorSource, device: str) -> None:
        import ray
        import torch

        if device == "cpu":
            # One torch thread per CPU Ray reserved for this actor, so that actors sharing a
            # node do not oversubscribe it.
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        self.extractor = detector.load(device)
        self.dim = self.extractor.feature_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from PIL import Image

        from index.featurestore import RegionRecord

        errors = [str(e) for e in batch["error"]]
        usable = [i for i, error in enumerate(errors) if not error]
        images = [Image.fromarray(np.asarray(batch["pixels"][i], dtype=np.uint8)) for i in usable]
        extra = [batch["extra_boxes"][i] for i in usable]  # each (m, 4), as annotation_boxes made it
        found = dict(zip(usable, self.extractor.extract(images, extra_boxes=extra), strict=True))
        nothing = RegionRecord(np.zeros((0, 4)), np.zeros(0), np.zeros((0, self.dim), np.float16), np.zeros(0))
        records = [found.get(i, nothing) for i in range(len(errors))]
        return {
            "key": batch["key"],
            "error": np.asarray(errors, dtype=object),
            "boxes": [r.boxes for r in records],  # each (n, 4) float32
            "scores": [r.scores for r in records],  # each (n,) float32
            # float16 here already: half the bytes through the object store, and the very values
            # the store would round to.
            "features": [np.asarray(r.features, dtype=np.float16) for r in records],  # each (n, D_raw)
            "kinds": [r.kinds for r in records],  # each (n,) int8
        }


def extract_collection_ray(
    collection: Collection,
    detector: DetectorSource,
    store: FeatureStore,
    *,
    address: str | None = None,
    concurrency: int | None = None,
    batch_size: int = 8,
    shard_records: int = SHARD_RECORDS,
    progress: bool = True,
    batch_extractor: type = RegionBatchExtractor,
) -> dict[str, Any]:
    """Append every artwork of ``collection`` not yet in ``store``, extracted on Ray.

    ``address``: a Ray cluster (``ray://host:10001`` or ``host:6379``); None joins the cluster
    of ``RAY_ADDRESS`` or one already started in this process, else starts a local one.
    ``concurrency``: detector actors (default: one per GPU, else one per CPU but one).
    ``batch_size``: images per forward pass. ``batch_extractor``: the callable class the
    actors run (a subclass may wrap it; the tests use one that kills its worker).

    Returns the local path's counts (``extracted``, ``already_present``, ``unreadable``,
    ``rows``) plus ``failures``: ``[{"id", "error"}]`` for images that could not be used.
    """
    from tqdm import tqdm

    ray = _import_ray()
    todo, present = artworks_to_extract(collection, store)
    counts: dict[str, Any] = {
        "extracted": 0, "already_present": present, "unreadable": 0, "rows": 0, "failures": [],
    }
    log.info("extracting %d artworks on Ray (%d already in %s)", len(todo), present, store.root)
    if not todo:
        return counts

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    try:
        regions = _pipeline(ray, collection, todo, detector, concurrency, batch_size, batch_extractor)
        bar = tqdm(total=len(todo), desc="extracting (ray)", unit="image", disable=not progress)
        try:
            _commit(regions, store, counts, shard_records, bar)
        except ray.exceptions.RayError as exc:
            raise RayExtractionError(
                f"extraction on Ray failed after committing {counts['extracted']} of {len(todo)} "
                f"artworks to {store.root}; rerun the same command to extract the rest "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        finally:
            bar.close()
    finally:
        if started_here:
            ray.shutdown()
    log_store(store)
    return counts


def _commit(regions: Any, store: FeatureStore, counts: dict[str, Any], shard_records: int, bar: Any) -> None:
    """Consume the records as they stream in; append them to the store a shard at a time."""
    from index.featurestore import RegionRecord

    for batch in regions.iter_batches(batch_size=shard_records, batch_format="numpy"):
        pending: dict[str, RegionRecord] = {}
        for i, key in enumerate(batch["key"]):
            key, error = str(key), str(batch["error"][i])
            if error:
                log.warning("skipping %s: %s", key, error)
                counts["unreadable"] += 1
                counts["failures"].append({"id": key, "error": error})
            elif not store.has(key) and key not in pending:
                # A retried Ray task may hand back a record a second time; the store would
                # refuse the duplicate (and the whole shard with it), so drop it here.
                pending[key] = RegionRecord(
                    boxes=batch["boxes"][i], scores=batch["scores"][i],
                    features=batch["features"][i], kinds=batch["kinds"][i],
                )
        if pending:
            counts["rows"] += append_shard(store, pending.items())
            counts["extracted"] += len(pending)
        bar.update(len(batch["key"]))


def _pipeline(
    ray: Any,
    collection: Collection,
    todo: list[Artwork],
    detector: DetectorSource,
    concurrency: int | None,
    batch_size: int,
    batch_extractor: type,
) -> Any:
    """The lazy Ray Dataset: artworks -> decoded images (tasks) -> records (actor pool)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if concurrency is None:
        concurrency = gpus or max(1, cpus - 1)
    if concurrency < 1 or batch_size < 1:
        raise ValueError(f"concurrency and batch size must be at least 1, got {concurrency} and {batch_size}")
    if concurrency + 1 > cpus:
        # Each actor holds one CPU for as long as it lives: with none left over, the decoding
        # tasks never get scheduled and the run waits forever.
        raise ValueError(
            f"--concurrency {concurrency}: each detector actor takes a CPU and decoding images "
            f"needs at least one more, but the Ray cluster has {cpus} CPUs; use at most "
            f"{max(cpus - 1, 0)} actors (or a cluster with more CPUs)"
        )
    device = "cuda" if gpus else "cpu"
    log.info("Ray cluster: %s CPUs, %d GPUs; %d detector actors on %s, %d images per batch",
             resources.get("CPU", 0), gpus, concurrency, device, batch_size)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours (tqdm, per committed shard) is the one to read
    rows = [
        {"key": a.id, "path": str(collection.image_path(a).resolve()), "extra_boxes": annotation_boxes(a)}
        for a in todo
    ]
    return ray.data.from_items(rows).map(decode_artwork).map_batches(
        batch_extractor,
        fn_constructor_kwargs={"detector": detector, "device": device},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        max_restarts=ACTOR_RESTARTS,
        max_task_retries=ACTOR_RESTARTS,
    )


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a wrong ``--address``: Ray itself retries connecting for minutes."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailableError(
            f"--address {address!r}: expected host:port (the head's GCS, e.g. head:6379) or "
            "ray://host:port (Ray Client, e.g. ray://head:10001)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayUnavailableError(
            f"--address {address}: nothing answers at {host}:{port} ({exc}); is the Ray head "
            "running (`ray start --head`) and the port open?"
        ) from exc


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(
            "--engine ray needs Ray Data: pip install 'artalign[ray]' (or drop --engine ray to "
            "extract on this machine)"
        ) from exc
    return ray
