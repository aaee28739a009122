"""The thesis's Table 4.1 grid: five SCAN variants trained and evaluated on one collection.

Its own module: it trains (training.train) and evaluates (training.evaluate), and training
already imports evaluation for its validation scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.checkpoint import load_checkpoint
from training.evaluate import K_CANDIDATES, evaluate, format_table, result_cells
from training.train import TrainOptions, train

log = logging.getLogger(__name__)

# The thesis's Table 4.1 rows: (label, direction, agg, bidirectional GRU).
GRID = (
    ("t-i LSE", "t2i", "lse", True),
    ("t-i AVG", "t2i", "mean", True),
    ("i-t LSE", "i2t", "lse", True),
    ("i-t AVG", "i2t", "mean", True),
    ("uni-GRU i-t AVG", "i2t", "mean", False),
)


def run_grid(checkpoint: Path, collection_root: Path, *, features: Path | None = None,
             split: str = "test", k: int = K_CANDIDATES, epochs: int | None = None,
             device: str = "cpu") -> dict:
    """Train and evaluate the five Table 4.1 variants with ``checkpoint``'s other options.

    Each variant's checkpoint goes to ``<checkpoint stem>-grid/<variant>.pt``; the thesis's
    per-direction λ_softmax defaults apply (t2i 9, i2t 4).
    """
    base = load_checkpoint(checkpoint, kind="scan").record or {}
    if "options" not in base:
        raise ValueError(f"{checkpoint}: its record holds no training options to vary")
    folder = Path(checkpoint).parent / f"{Path(checkpoint).stem}-grid"
    rows = []
    for label, direction, agg, bidirectional in GRID:
        options = dict(base["options"], collection=str(collection_root), direction=direction,
                       agg=agg, bidirectional=bidirectional, lambda_softmax=None, resume=False,
                       device=device, out=str(folder / f"{label.replace(' ', '-')}.pt"))
        if features is not None:
            options["features"] = str(features)
        if epochs is not None:
            options["epochs"] = epochs
            options["lr_update"] = min(options["lr_update"], epochs)
        log.info("grid row %s: training %s", label, options["out"])
        trained = train(TrainOptions.from_dict(options))
        result = evaluate(trained.checkpoint, collection_root, features=features, split=split,
                          k=k, device=device)
        result["label"] = label
        result["epoch_seconds"] = [row["train_seconds"] for row in trained.history]
        rows.append(result)
    return {"grain": rows[0]["grain"], "split": split, "rows": rows}


def format_grid(grid: dict) -> str:
    """The five variants as one table, like the thesis's Table 4.1 (exhaustive SCAN)."""
    rows = [(row["label"], [*result_cells(row, "scan"), f"{row['rsum']['pooled']:.1f}",
                            f"{np.mean(row['epoch_seconds']):.0f}"]) for row in grid["rows"]]
    return (f"{grid['grain']} grain, split {grid['split']} (exhaustive SCAN)\n"
            + format_table(["pooled rsum", "s/epoch"], rows, grid["rows"][0]))
