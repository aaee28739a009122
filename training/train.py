"""Training SCAN on a collection's feature store and text.

One epoch shuffles the positive pairs (see :mod:`training.data`) into batches and minimises
SCAN's hinge triplet loss on the cross-attention scores plus the same loss on the pooled
first-stage vectors (``SCAN.forward``), with in-batch pairs from the same artwork or with
the same text masked out as negatives. After each epoch the validation split is scored
(rsum of R@1/5/10 in both directions, SCAN's model-selection figure) and the best epoch is
written to ``--out``. Beside it:

- ``<out stem>.csv``: one line per epoch: losses, learning rate, validation recalls, seconds;
- ``<out stem>.png``: the same as two plots, drawn when training ends;
- ``<out stem>.resume.pt``: model, optimiser and schedule after the last finished epoch, so
  ``--resume`` continues an interrupted run (or a finished one, with more ``--epochs``).

The learning rate follows SCAN: 2e-4, divided by ten after ``lr_update`` epochs.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from collection.layout import Collection
from index.atomic import write_atomic
from index.featurestore import FeatureStore
from models.encoder import Encoder
from models.scan import SCAN, ScanConfig, ScanLosses, contrastive_loss, pooled
from models.text import TextReader, minilm_weights_sha256
from training import metrics
from training.data import (
    GRAINS,
    AlignmentData,
    Batch,
    NegativeFragments,
    alignment_data,
    batches,
    n_batches,
    negative_fragments,
    open_store,
    resolve_supervision,
)
from training.evaluate import score

log = logging.getLogger(__name__)

RESUME_FORMAT = "artalign-scan-training-state"


@dataclass
class TrainOptions:
    """Everything a training run depends on; saved in the checkpoint's record."""

    collection: str
    out: str
    grain: str = "fine"
    features: str | None = None  # default: <collection>/features
    supervision: str = "auto"  # fine grain: "boxes" (annotations), "weak", or auto
    direction: str = "t2i"
    agg: str = "lse"
    bidirectional: bool = True
    lambda_softmax: float | None = None  # None: the thesis's default for the direction
    lambda_lse: float = 6.0
    margin: float = 0.2
    max_violation: bool = True
    # VSE++'s advice: hardest negatives from the start can leave the loss stuck at the margin
    # on small data; sum over all negatives for this many epochs first (max_violation only)
    warmup_epochs: int = 0
    embed_dim: int = 1024
    word_dim: int = 300
    text_encoder: str = "gru"  # "gru" or "minilm" (frozen, its outputs cached per text)
    # minilm: "words" (projection + vocabulary codes), "linear", or "gru" (MiniLM's features
    # beside vocabulary embeddings, read by a GRU)
    minilm_head: str = "words"
    word_dropout: float = 0.5  # minilm heads "words", "gru": known words read as unknown in training
    pooled_weight: float = 1.0
    xattn_weight: float = 1.0  # 0: a vectors-only baseline, selected by its pooled rsum
    # fine grain with boxes: negative fragments per artwork of a batch (its whole image and
    # negatives - 1 extracted fragments; see training.data.NegativeFragments); 0 = none
    negatives: int = 3
    epochs: int = 30
    lr: float = 2e-4
    lr_update: int = 15  # divide the learning rate by 10 after this many epochs
    grad_clip: float = 2.0
    batch_size: int = 128
    seed: int = 0
    val_split: str = "val"
    device: str = "cpu"
    resume: bool = False

    def __post_init__(self) -> None:
        if self.grain not in GRAINS:
            raise ValueError(f"grain must be one of {GRAINS}, got {self.grain!r}")
        for name in ("epochs", "lr_update", "batch_size", "embed_dim", "word_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (a pair needs in-batch negatives)")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def paths(self) -> dict[str, Path]:
        out = Path(self.out)
        stem = out.with_suffix("")
        return {"checkpoint": out, "csv": Path(f"{stem}.csv"), "plot": Path(f"{stem}.png"),
                "resume": Path(f"{stem}.resume.pt")}


@dataclass
class TrainResult:
    checkpoint: Path
    model_version: str
    best_epoch: int
    best_rsum: float
    history: list[dict[str, Any]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate(encoder: Encoder, data: AlignmentData) -> dict[str, Any]:
    """rsum and recalls of SCAN (and of the pooled vectors) on the validation pairs."""
    scores = score(encoder, data, progress=False)
    relevant = data.relevance()
    scan = metrics.bidirectional(scores.scan, relevant)
    pooled = metrics.bidirectional(scores.pooled, relevant)
    row = {f"val_{d}_r{k}": scan[d][f"r{k}"] for d in ("i2t", "t2i") for k in metrics.KS}
    row["val_rsum"] = scan["rsum"]
    row["val_pooled_rsum"] = pooled["rsum"]
    return row


def train(options: TrainOptions) -> TrainResult:
    """Train, validate each epoch, keep the best checkpoint; see the module docstring."""
    paths = options.paths()
    seed_everything(options.seed)
    collection = Collection.load(options.collection)
    store = open_store(collection.root, Path(options.features) if options.features else None)
    vocab = collection.word_vocab
    config = _scan_config(options, len(vocab), store.dim)
    reader = TextReader(config.text_encoder, vocab)  # as models.encoder.Encoder reads text
    supervision, train_data, val_data, negatives = _training_data(options, collection, store,
                                                                  reader)
    device = torch.device(options.device)
    model = SCAN(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=options.lr_update, gamma=0.1)
    rng = np.random.default_rng(options.seed)
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "rsum": -1.0, "version": ""}
    if options.resume:
        history, best, rng = _restore(paths["resume"], model, optimizer, schedule, config)
    first_epoch = len(history) + 1
    if first_epoch > options.epochs:
        log.info("%s already trained %d epochs; nothing to do (raise --epochs to continue)",
                 paths["resume"], len(history))
    log.info("training SCAN (%s, %s, %s %s) on %d pairs, validating on %d: %d parameters",
             options.grain, supervision, config.direction, config.agg, len(train_data.pairs),
             len(val_data.pairs), sum(p.numel() for p in model.parameters()))

    for epoch in range(first_epoch, options.epochs + 1):
        started = time.perf_counter()
        row = _train_epoch(model, optimizer, options, epoch,
                           batches(train_data, options.batch_size, rng, negatives),
                           n_batches(train_data, options.batch_size), device)
        schedule.step()
        row["train_seconds"] = time.perf_counter() - started
        row.update(validate(Encoder(model, vocab), val_data))
        history.append(row)
        # A vectors-only baseline is judged by its vectors: its cross attention is untrained.
        selected = row["val_pooled_rsum"] if config.xattn_weight == 0 else row["val_rsum"]
        if selected > best["rsum"]:
            record = _record(options, supervision, store, epoch, row, history)
            best = {"epoch": epoch, "rsum": selected,
                    "version": model.save(paths["checkpoint"], vocab, record)}
        log.info("epoch %d: loss %.4f (xattn %.4f, pooled %.4f), val rsum %.1f (pooled %.1f), "
                 "%.1fs%s", epoch, row["loss"], row["xattn_loss"], row["pooled_loss"],
                 row["val_rsum"], row["val_pooled_rsum"], row["train_seconds"],
                 ", best so far: saved" if best["epoch"] == epoch else "")
        _save_state(paths["resume"], model, optimizer, schedule, history, best, rng)
        write_log(paths["csv"], history)
    if history:
        plot_history(paths["plot"], history)  # once: drawing costs about a second
    if best["epoch"] == 0:
        raise ValueError(f"{paths['checkpoint']}: no epoch was trained")
    log.info("best epoch %d (val rsum %.1f) in %s, model version %s", best["epoch"],
             best["rsum"], paths["checkpoint"], best["version"][:12])
    return TrainResult(paths["checkpoint"], best["version"], best["epoch"], best["rsum"], history)


def _training_data(options: TrainOptions, collection: Collection, store: FeatureStore,
                   reader: TextReader
                   ) -> tuple[str, AlignmentData, AlignmentData, NegativeFragments | None]:
    """The supervision used, the training and validation pairs (their texts read by
    ``reader`` once, here), and the extra negatives."""
    started = time.perf_counter()
    supervision = ("captions" if options.grain == "coarse"
                   else resolve_supervision(collection.split("train"), options.supervision))
    mode = supervision if supervision != "captions" else "auto"
    train_data = alignment_data(collection, store, reader, grain=options.grain, split="train",
                                supervision=mode)
    val_data = alignment_data(collection, store, reader, grain=options.grain,
                              split=options.val_split, supervision=mode)
    log.info("read %d + %d texts with the %s text encoder in %.1fs", len(train_data.texts),
             len(val_data.texts), reader.encoder, time.perf_counter() - started)
    negatives = (negative_fragments(collection, store, reader, split="train",
                                    per_artwork=options.negatives)
                 if supervision == "boxes" and options.negatives > 0 else None)
    return supervision, train_data, val_data, negatives


def _scan_config(options: TrainOptions, vocab_size: int, raw_dim: int) -> ScanConfig:
    return ScanConfig(
        vocab_size=vocab_size, raw_dim=raw_dim, embed_dim=options.embed_dim,
        word_dim=options.word_dim, bidirectional=options.bidirectional,
        direction=options.direction, agg=options.agg, lambda_softmax=options.lambda_softmax,
        lambda_lse=options.lambda_lse, margin=options.margin,
        max_violation=options.max_violation, grad_clip=options.grad_clip,
        pooled_weight=options.pooled_weight, xattn_weight=options.xattn_weight,
        text_encoder=options.text_encoder, minilm_head=options.minilm_head,
        word_dropout=options.word_dropout,
        minilm_sha256=minilm_weights_sha256() if options.text_encoder == "minilm" else None,
    )


def _train_epoch(model: SCAN, optimizer: torch.optim.Optimizer, options: TrainOptions,
                 epoch: int, epoch_batches: Iterator[Batch], n_steps: int,
                 device: torch.device) -> dict[str, Any]:
    """One pass over the training batches; returns the epoch's row of mean losses."""
    model.train()
    # The config saved with the model keeps options.max_violation; only the loss of the
    # warm-up epochs differs.
    model.config.max_violation = options.max_violation and epoch > options.warmup_epochs
    sums = {"loss": 0.0, "xattn_loss": 0.0, "pooled_loss": 0.0}
    steps = 0
    # A bar on a terminal only: in a log file the epoch's summary line (train) says what happened.
    progress = tqdm(epoch_batches, unit="batch", total=n_steps, desc=f"epoch {epoch}/{options.epochs}",
                    disable=not sys.stderr.isatty())
    for batch in progress:
        losses = batch_losses(model, batch, device)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        steps += 1
        for name, value in zip(sums, losses, strict=True):
            sums[name] += float(value.detach())
        progress.set_postfix(loss=f"{sums['loss'] / steps:.3f}")
    model.config.max_violation = options.max_violation
    row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
    row.update({name: total / max(steps, 1) for name, total in sums.items()})
    return row


def batch_losses(model, batch: Batch, device: torch.device) -> ScanLosses:
    """SCAN's losses on a batch (``SCAN.forward``), plus, when the batch carries negative
    fragments, a hinge on the hardest of them for each text, in both stages."""
    if batch.negative_regions is None:
        return model(batch.regions.to(device), batch.region_lens.to(device),
                     batch.word_ids.to(device), batch.word_lens.to(device),
                     ignore_mask=batch.ignore.to(device))
    n = len(batch.region_lens)
    width = max(batch.regions.shape[1], batch.negative_regions.shape[1])
    raw = torch.cat([F.pad(batch.regions, (0, 0, 0, width - batch.regions.shape[1])),
                     F.pad(batch.negative_regions,
                           (0, 0, 0, width - batch.negative_regions.shape[1]))])  # (n+m, r, D)
    raw_lens = torch.cat([batch.region_lens, batch.negative_lens]).to(device)
    images = model.encode_images(raw.to(device), raw_lens)  # (n+m, r, d)
    word_lens = batch.word_lens.to(device)
    texts = model.encode_texts(batch.word_ids.to(device), word_lens)  # (n, w, d)
    config = model.config
    ignore = batch.ignore.to(device)
    negative_ignore = batch.negative_ignore.to(device)
    stages = []
    for scores in (model.similarity(images, raw_lens, texts, word_lens),  # (n+m, n)
                   pooled(images, raw_lens) @ pooled(texts, word_lens).T):
        loss = contrastive_loss(scores[:n], margin=config.margin,
                                max_violation=config.max_violation, ignore_mask=ignore)
        positives = scores[:n].diagonal()  # (n,)
        cost = (config.margin + scores[n:] - positives[None, :]).clamp_min(0)  # (m, n)
        cost = cost.masked_fill(negative_ignore, 0)
        stages.append(loss + (cost.amax(dim=0).sum() if config.max_violation else cost.sum()))
    xattn, first_stage = stages
    return ScanLosses(config.xattn_weight * xattn + config.pooled_weight * first_stage, xattn, first_stage)


def _record(options: TrainOptions, supervision: str, store, epoch: int, row: dict,
            history: list[dict]) -> dict[str, Any]:
    """The checkpoint's training record: how to train it again and how it did."""
    return {
        "grain": options.grain,
        "supervision": supervision,
        "options": asdict(options),
        "extractor": store.extractor,
        "feature_dim": store.dim,
        "epoch": epoch,
        "validation": {k: float(v) for k, v in row.items() if k.startswith("val_")},
        "epoch_seconds": [float(r["train_seconds"]) for r in history],
    }


def _save_state(path: Path, model, optimizer, schedule, history, best, rng) -> None:
    state = {"format": RESUME_FORMAT, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "config": model.config.to_dict(), "history": history, "best": best,
             "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    write_atomic(path, lambda handle: torch.save(state, handle))


def _restore(path: Path, model, optimizer, schedule, config):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from (train without "
                                "--resume first)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: not an artalign SCAN training state")
    # through ScanConfig, so that a state saved before a field existed reads with its default
    saved = ScanConfig.from_dict(state["config"]).to_dict()
    if saved != config.to_dict():
        changed = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v)
        raise ValueError(f"{path}: was trained with a different model config (differs in "
                         f"{', '.join(changed)}); resume with the same options")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    log.info("resuming from %s after epoch %d", path, len(state["history"]))
    return state["history"], state["best"], rng


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """The per-epoch CSV log, rewritten whole (atomically) after every epoch."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_atomic(path, lambda handle: handle.write(text.getvalue().encode()))


def plot_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Losses and validation rsum per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (losses, recalls) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("loss", "xattn_loss", "pooled_loss"):
        losses.plot(epochs, [row[name] for row in history], marker="o", label=name)
    losses.set(xlabel="epoch", ylabel="mean batch loss", title="training loss")
    losses.legend()
    for name, label in (("val_rsum", "SCAN"), ("val_pooled_rsum", "pooled vectors")):
        recalls.plot(epochs, [row[name] for row in history], marker="o", label=label)
    recalls.set(xlabel="epoch", ylabel="rsum (R@1+5+10, both directions)",
                title="validation rsum")
    recalls.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    write_atomic(path, lambda handle: handle.write(buffer.getvalue()))
