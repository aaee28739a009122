"""Training the region detector on a collection's annotation boxes, and its average precision.

The detector learns "where are the motifs" from the collection's ground-truth annotations
(class-agnostic by default: every box is an "object"). With attributes it also learns to
name the words of each box's phrase (:func:`attribute_vocabulary`), so its box features say
what the phrases say, not only where an object is. Validation is mAP@0.5 on the val
split, computed by :func:`mean_average_precision` (ours, tested against hand-made boxes).
Training stops at ``--minutes`` or ``--epochs``, whichever comes first; the learning rate
follows a cosine over that same budget. Every epoch ends with a validation pass and an
atomic checkpoint (config + weights + training record) in ``<out stem>.resume.pt``, so an
interrupted run resumes from its last epoch with ``--resume`` (the optimizer's moments
restart, after a short warmup); ``out`` itself holds the best epoch by validation mAP.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from collection.images import load_image
from collection.layout import Artwork, Collection
from index.fragments import iou
from models.checkpoint import load_checkpoint, save_checkpoint
from models.regions import (
    CHECKPOINT_KIND,
    PRETRAINED_BACKBONES,
    DetectorConfig,
    RegionExtractor,
    build_detector,
    load_efficientnet_weights,
    load_imagenet_weights,
    resize_for_detection,
    to_tensor,
)
from models.vocab import tokenize

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5


# -- average precision ----------------------------------------------------------------------


def average_precision(
    detections: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    iou_threshold: float = IOU_THRESHOLD,
) -> float:
    """AP of one class over a set of images (all-point interpolation, as VOC 2010+ and COCO).

    ``detections[i]`` = (boxes (n, 4), scores (n,)) on image i; ``ground_truth[i]`` = boxes
    (m, 4). Detections are taken best first over all images; each one is a true positive when
    it overlaps a not-yet-matched ground-truth box of its image with IoU >= ``iou_threshold``
    (the best such box), else a false positive. AP is the area under the precision-recall
    curve after making precision non-increasing. NaN when there is no ground truth at all.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    n_truth = sum(len(np.asarray(g).reshape(-1, 4)) for g in ground_truth)
    if n_truth == 0:
        return float("nan")
    entries = [
        (float(score), image, row)
        for image, (boxes, scores) in enumerate(detections)
        for row, score in enumerate(np.asarray(scores).reshape(-1))
    ]
    # Best first; ties keep image/row order so the result does not depend on sort stability.
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    matched = [np.zeros(len(np.asarray(g).reshape(-1, 4)), dtype=bool) for g in ground_truth]
    overlaps = [
        iou(np.asarray(boxes).reshape(-1, 4), np.asarray(truth).reshape(-1, 4))
        for (boxes, _), truth in zip(detections, ground_truth, strict=True)
    ]
    true_positive = np.zeros(len(entries), dtype=bool)
    for rank, (_, image, row) in enumerate(entries):
        candidates = np.where(matched[image], -1.0, overlaps[image][row]) if matched[image].size else np.array([])
        if candidates.size and candidates.max() >= iou_threshold:
            matched[image][int(candidates.argmax())] = True
            true_positive[rank] = True
    hits = np.cumsum(true_positive)
    recall = hits / n_truth
    precision = hits / np.arange(1, len(entries) + 1)
    # Precision envelope: the best precision at this recall or any higher one.
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(entries) else precision
    previous_recall = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - previous_recall) * envelope))


def mean_average_precision(
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = IOU_THRESHOLD,
) -> dict[str, Any]:
    """mAP over classes: ``detections[i]`` = (boxes, scores, labels), ``ground_truth[i]`` =
    (boxes, labels). Classes without ground truth are left out of the mean."""
    classes = sorted({int(c) for _, labels in ground_truth for c in np.asarray(labels).reshape(-1)})
    per_class = {}
    for label in classes:
        per_class[label] = average_precision(
            [(np.asarray(b).reshape(-1, 4)[np.asarray(lab) == label], np.asarray(s)[np.asarray(lab) == label])
             for b, s, lab in detections],
            [np.asarray(b).reshape(-1, 4)[np.asarray(lab) == label] for b, lab in ground_truth],
            iou_threshold,
        )
    return {
        "map": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "per_class": per_class,
        "images": len(ground_truth),
        "ground_truth_boxes": int(sum(len(np.asarray(lab).reshape(-1)) for _, lab in ground_truth)),
    }


# -- data -----------------------------------------------------------------------------------


@dataclass
class DetectionSample:
    """One training image at the detector's size and its target boxes there."""

    image: Tensor  # (3, h, w) float in [0, 1], longer side = image_size
    boxes: Tensor  # (m, 4) xyxy in the resized image
    labels: Tensor  # (m,) int64, 1-based (0 is background)
    attributes: Tensor  # (m, A) float multi-hot: the attribute words of each box's phrase


class DetectionDataset(torch.utils.data.Dataset):
    """Artworks with annotations, resized like the extractor resizes them; random flips."""

    def __init__(
        self, collection: Collection, artworks: list[Artwork], config: DetectorConfig, *, augment: bool
    ) -> None:
        self.collection = collection
        self.artworks = artworks
        self.config = config
        self.augment = augment
        self.class_ids = {name: i + 1 for i, name in enumerate(config.class_names)}
        self.attribute_ids = {name: i for i, name in enumerate(config.attribute_names)}

    def __len__(self) -> int:
        return len(self.artworks)

    def __getitem__(self, index: int) -> DetectionSample:
        artwork = self.artworks[index]
        image = load_image(self.collection.image_path(artwork))
        resized, fx, fy = resize_for_detection(image, self.config.image_size)
        boxes, labels, phrases = annotation_targets(artwork, self.class_ids)
        attributes = np.zeros((len(phrases), len(self.attribute_ids)), dtype=np.float32)
        for row, phrase in enumerate(phrases):
            attributes[row] = attribute_targets(phrase, self.attribute_ids)
        boxes = boxes / np.array([fx, fy, fx, fy], dtype=np.float32)
        tensor = to_tensor(resized)
        if self.augment and random.random() < 0.5:
            # Horizontal flip: motifs in artworks have no preferred left/right.
            tensor = tensor.flip(-1)
            width = tensor.shape[-1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        return DetectionSample(tensor, torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(labels),
                               torch.from_numpy(attributes))

    def target(self, sample: DetectionSample) -> dict[str, Tensor]:
        """What the model's training forward takes for ``sample``."""
        target = {"boxes": sample.boxes, "labels": sample.labels}
        if self.attribute_ids:
            target["attributes"] = sample.attributes
        return target


def annotation_targets(
    artwork: Artwork, class_ids: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(boxes (m, 4) float32 original pixels, labels (m,) int64 1-based, phrases) of an
    artwork's annotations; with one class every box is that class, otherwise phrases not in
    ``class_ids`` are left out."""
    boxes, labels, phrases = [], [], []
    for annotation in artwork.annotations:
        if len(class_ids) == 1:
            label = 1
        elif annotation.phrase in class_ids:
            label = class_ids[annotation.phrase]
        else:
            continue
        boxes.append(annotation.box)
        labels.append(label)
        phrases.append(annotation.phrase)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64), phrases


# Words that name no attribute of a box; everything else in an annotation phrase does.
ATTRIBUTE_STOPWORDS = frozenset({"a", "an", "the", "of", "with", "and", "in", "on", "its", "his", "her"})


def attribute_vocabulary(artworks: Sequence[Artwork], *, min_boxes: int = 5) -> list[str]:
    """The attribute words a detector can learn from ``artworks``' annotations: every word of
    an annotation phrase (tokenised as the text side does) on at least ``min_boxes`` boxes,
    stop words left out; sorted."""
    counts = Counter(word for artwork in artworks for annotation in artwork.annotations
                     for word in set(tokenize(annotation.phrase)) if word not in ATTRIBUTE_STOPWORDS)
    return sorted(word for word, count in counts.items() if count >= min_boxes)


def attribute_targets(phrase: str, attribute_ids: dict[str, int]) -> np.ndarray:
    """(A,) float32 multi-hot of the attribute words in ``phrase``."""
    out = np.zeros(len(attribute_ids), dtype=np.float32)
    for word in tokenize(phrase):
        if word in attribute_ids:
            out[attribute_ids[word]] = 1.0
    return out


def collate(samples: list[DetectionSample]) -> list[DetectionSample]:
    return samples


# -- training -------------------------------------------------------------------------------


@dataclass
class TrainOptions:
    minutes: float = 30.0
    epochs: int = 1000  # the time budget usually stops training first
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 10.0
    val_images: int = 300  # validation subset per epoch, to keep the check short on a CPU
    workers: int = 1
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (one per core)
    device: str = "cpu"  # where the model trains and validates ("cuda" for a GPU)
    pretrained_lr_scale: float = 0.1  # a pretrained backbone's learning rate, relative


def parameter_groups(model: torch.nn.Module, options: TrainOptions) -> list[dict[str, Any]]:
    """The trainable parameters; a pretrained backbone's at ``pretrained_lr_scale`` times the
    learning rate, so fine-tuning adapts the ImageNet features rather than overwriting them."""
    prefix = getattr(model.backbone, "pretrained_prefix", None)
    pretrained, fresh = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_pretrained = prefix is not None and name.startswith(f"backbone.{prefix}")
            (pretrained if is_pretrained else fresh).append(parameter)
    groups = [{"params": fresh, "lr_scale": 1.0}]
    if pretrained:
        groups.append({"params": pretrained, "lr_scale": options.pretrained_lr_scale})
    return groups


def evaluate_detector(
    extractor: RegionExtractor, collection: Collection, artworks: list[Artwork], *, batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """mAP@0.5 of ``extractor.detect`` on ``artworks`` (boxes of the annotations as truth), and
    ``box_recall``: the share of annotation boxes that some extracted region (what ``extract``
    stores; not the whole image) covers with IoU >= 0.5, the ceiling of fragment retrieval."""
    class_ids = {name: i + 1 for i, name in enumerate(extractor.config.class_names)}
    detections, truth = [], []
    covered = 0
    batches = range(0, len(artworks), batch_size)
    for start in tqdm(batches, desc="validating", unit="batch", disable=not progress, leave=False):
        chunk = artworks[start : start + batch_size]
        images = [load_image(collection.image_path(a)) for a in chunk]
        for artwork, found in zip(chunk, extractor.detect(images), strict=True):
            boxes, labels, _ = annotation_targets(artwork, class_ids)
            truth.append((boxes, labels - 1))
            detections.append((found.boxes, found.scores, found.labels))
            if len(boxes) and len(found.regions):
                covered += int((iou(found.regions, boxes).max(axis=0) >= IOU_THRESHOLD).sum())
    result = mean_average_precision(detections, truth)
    result["box_recall"] = covered / max(1, result["ground_truth_boxes"])
    return result


def train_detector(
    collection: Collection,
    out: str | Path,
    *,
    config: DetectorConfig | None = None,
    options: TrainOptions | None = None,
    resume: str | Path | None = None,
    init: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a detector on ``collection``'s train split and return the training record.

    After every epoch it validates (mAP@0.5 and box recall on the val split) and writes the
    epoch's checkpoint to ``<out stem>.resume.pt`` (what ``resume`` continues from), and to
    ``out`` when its val mAP is the best so far: ``out`` is the best epoch, not the last. At
    the end the best epoch is measured on the test split, when the collection has one.

    ``init``: a detector checkpoint to start from (not resumed: a new run with its own budget);
    every tensor of it whose name and shape fit ``config``'s model is loaded, the rest (a new
    attribute head, a different class count) starts at random."""
    options = options or TrainOptions()
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    record: dict[str, Any] = {"epochs": 0, "steps": 0, "seconds": 0.0, "history": []}
    state = None
    if resume is not None:
        checkpoint = load_checkpoint(resume, kind=CHECKPOINT_KIND)
        config = DetectorConfig.from_dict(checkpoint.config)
        state = checkpoint.state_dict
        record = dict(checkpoint.record or record)
        log.info("resuming %s after %d epochs (%.0f s)", resume, record["epochs"], record["seconds"])
    config = config or DetectorConfig()

    train = [a for a in collection.split("train") if a.annotations]
    val = [a for a in collection.split("val") if a.annotations][: options.val_images]
    if not train:
        raise ValueError(f"{collection.root}: no annotated artworks in the train split to train a detector on")
    # A pretrained backbone starts from its ImageNet weights, unless the run resumes or inits.
    model = build_detector(config, pretrained=config.backbone in PRETRAINED_BACKBONES
                           and state is None and init is None)
    if state is not None:
        model.load_state_dict(state)
    elif init is not None:
        start = load_checkpoint(init, kind=CHECKPOINT_KIND)
        own = model.state_dict()
        fitting = {k: v for k, v in start.state_dict.items() if k in own and own[k].shape == v.shape}
        if not fitting:
            raise ValueError(f"{init}: no weights fit a {config.backbone} detector of this configuration")
        model.load_state_dict(fitting, strict=False)
        fresh = sorted(set(own) - set(fitting))
        if any(name.startswith("backbone.pristine.") for name in fresh):  # never a random "pristine" net
            model.backbone.load_imagenet(load_imagenet_weights(), pristine_only=True)
        if any(name.startswith("backbone.efficientnet.") for name in fresh):  # nor a random EfficientNet
            model.backbone.load_efficientnet(load_efficientnet_weights())
        record["init"] = start.sha256
        log.info("starting from %s: %d tensors loaded, %d new (%s)", init, len(fitting), len(fresh),
                 ", ".join(fresh[:4]) + (" ..." if len(fresh) > 4 else ""))
    device = torch.device(options.device)
    model.to(device)
    dataset = DetectionDataset(collection, train, config, augment=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=options.batch_size, shuffle=True, drop_last=len(train) > options.batch_size,
        collate_fn=collate, num_workers=options.workers, persistent_workers=options.workers > 0,
    )
    optimizer = torch.optim.AdamW(parameter_groups(model, options), lr=options.learning_rate,
                                  weight_decay=options.weight_decay)
    budget_seconds = options.minutes * 60
    total_steps = options.epochs * len(loader)
    log.info(
        "training %s at %d px on %d annotated images (%d boxes), validating on %d; budget %.0f min / %d epochs",
        config.backbone, config.image_size, len(train), sum(len(a.annotations) for a in train), len(val),
        options.minutes, options.epochs,
    )

    def learning_rate(step: int, seconds: float) -> float:
        # Cosine over whichever budget (time or epochs) runs out first; linear warmup.
        done = min(1.0, max(seconds / budget_seconds, record["steps"] / max(1, total_steps)))
        warmup = min(1.0, (step + 1) / options.warmup_steps)
        return options.learning_rate * warmup * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))

    started = time.monotonic() - record["seconds"]
    session_step = 0
    out_of_time = False
    resume_path = Path(out).with_name(f"{Path(out).stem}.resume.pt")
    while record["epochs"] < options.epochs and not out_of_time:
        model.train()
        losses, attribute_losses = [], []
        bar = tqdm(loader, desc=f"epoch {record['epochs'] + 1}", unit="batch", disable=not progress)
        for batch in bar:
            seconds = time.monotonic() - started
            if seconds >= budget_seconds:
                out_of_time = True
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(session_step, seconds) * group["lr_scale"]
            loss_parts = model([s.image.to(device) for s in batch],
                               [{k: v.to(device) for k, v in dataset.target(s).items()} for s in batch])
            loss = sum(loss_parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            if "loss_attributes" in loss_parts:
                attribute_losses.append(loss_parts["loss_attributes"].item())
            record["steps"] += 1
            session_step += 1
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if not progress and len(losses) % max(1, len(loader) // 4) == 0:
                log.info("epoch %d: %d of %d batches, loss %.3f, %.0f s", record["epochs"] + 1, len(losses),
                         len(loader), np.mean(losses[-20:]), time.monotonic() - started)
            if on_step is not None:
                on_step(record["steps"], losses[-1])
        if not losses:
            break
        if out_of_time:
            log.info("epoch %d cut short by the time limit (%.3g min) after %d of %d batches",
                     record["epochs"] + 1, options.minutes, len(losses), len(loader))
        record["epochs"] += 1
        record["seconds"] = time.monotonic() - started
        extractor = RegionExtractor(model, config, version="training", device=device)
        metrics = (evaluate_detector(extractor, collection, val, progress=progress) if val
                   else {"map": float("nan"), "box_recall": float("nan")})
        entry = {
            "epoch": record["epochs"], "steps": record["steps"], "seconds": round(record["seconds"], 1),
            "loss": float(np.mean(losses)), "val_map50": metrics["map"],
            "val_box_recall": metrics["box_recall"], "partial": out_of_time,
        }
        if attribute_losses:
            entry["loss_attributes"] = float(np.mean(attribute_losses))
        record["history"].append(entry)
        # Without a val split every epoch is "best": the last one is kept.
        best = record.get("best_epoch") is None or not val or metrics["map"] > record["val_map50"]
        if best:
            record.update(best_epoch=entry["epoch"], val_map50=metrics["map"], val_box_recall=metrics["box_recall"])
        record.update(
            val_images=len(val), train_images=len(train), backbone=config.backbone, image_size=config.image_size,
            batch_size=options.batch_size, threads=torch.get_num_threads(), device=device.type,
        )
        state_dict = model.state_dict()
        save_checkpoint(resume_path, kind=CHECKPOINT_KIND, config=config.to_dict(), state_dict=state_dict,
                        record=record)
        if best:
            sha = save_checkpoint(out, kind=CHECKPOINT_KIND, config=config.to_dict(), state_dict=state_dict,
                                  record=record)
        log.info("epoch %d: loss %.3f, val mAP@0.5 %.3f, box recall %.3f, %.0f s; %s", entry["epoch"],
                 entry["loss"], metrics["map"], metrics["box_recall"], record["seconds"],
                 f"best so far, saved {out} ({sha[:12]})" if best else
                 f"not better than epoch {record['best_epoch']} ({record['val_map50']:.3f}), {out} kept")
    _test_best(collection, out, record, progress, device)
    return record


def _test_best(collection: Collection, out: str | Path, record: dict[str, Any], progress: bool,
               device: torch.device) -> None:
    """Add the best epoch's test mAP@0.5 and box recall to ``record`` (when there is a test split)."""
    test = [a for a in collection.split("test") if a.annotations]
    if not test or not Path(out).is_file():
        log.info("no annotated test split in %s: no test mAP", collection.root)
        return
    metrics = evaluate_detector(RegionExtractor.from_checkpoint(out, device), collection, test, progress=progress)
    record.update(test_map50=metrics["map"], test_box_recall=metrics["box_recall"], test_images=len(test))
    log.info("best epoch %s on %d test images: mAP@0.5 %.3f, box recall %.3f", record.get("best_epoch"),
             len(test), metrics["map"], metrics["box_recall"])

