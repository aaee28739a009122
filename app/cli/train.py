"""`artalign train` and `artalign evaluate`: SCAN on a collection's region features and text."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# `--preset demo`: the small model committed as demo/scan.pt (see docs/RESULTS.md). On the
# attribute detector's features the hardest in-batch negative is informative (a gold bird
# against gold fish), so SCAN's max-violation loss is used after 3 epochs summed over all
# negatives (on the class-agnostic features it never left the margin). Both attention
# directions, and a higher learning rate than SCAN's, learn in about a minute of CPU. The text
# side is the pretrained MiniLM (frozen), so visitors' own words reach the model.
PRESETS = {
    "demo": {"collection": "var/synth-2000", "grain": "fine", "out": "demo/scan.pt",
             "embed_dim": 256, "word_dim": 128, "text_encoder": "minilm", "direction": "both",
             "agg": "mean", "warmup_epochs": 3, "pooled_weight": 0.2, "lr": 2e-3, "epochs": 12,
             "lr_update": 8, "batch_size": 128},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the SCAN alignment model on a collection's features",
        description=(
            "Train SCAN (stacked cross attention) to align image fragments with text.\n"
            "  coarse: each artwork's whole image <-> its captions\n"
            "  fine:   fragments <-> noun phrases: an annotated box <-> its phrase when the\n"
            "          collection has annotations, else (weak supervision) an artwork's regions\n"
            "          <-> the sequence of its phrases.\n"
            "The best epoch by validation rsum is written to --out; beside it a CSV log, a PNG\n"
            "plot and a .resume.pt training state.  Example:\n"
            "  artalign train --collection var/synth-2000 --grain fine --out var/scan-fine.pt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", choices=sorted(PRESETS),
                       help="named defaults; `demo` trains the small committed demo/scan.pt "
                            "on var/synth-2000 (other options still override it)")
    train.add_argument("--collection", type=Path, help="the collection folder")
    train.add_argument("--features", type=Path,
                       help="feature store folder (default: COLLECTION/features)")
    train.add_argument("--grain", choices=("coarse", "fine"), help="what is aligned (default fine)")
    train.add_argument("--supervision", choices=("auto", "boxes", "weak"),
                       help="fine grain: annotated boxes, weak (whole artwork <-> its phrases), "
                            "or auto: boxes when the collection has annotations (default)")
    train.add_argument("--out", type=Path, help="where to write the best checkpoint (.pt)")
    model = train.add_argument_group("model (the thesis's Table 4.1 varies the first three)")
    model.add_argument("--direction", choices=("t2i", "i2t", "both"),
                       help="t2i: words attend to regions (default); i2t: regions attend to words; "
                            "both: the mean of the two scores (SCAN's t-i + i-t ensemble in one model)")
    model.add_argument("--agg", choices=("lse", "mean", "max", "sum"),
                       help="how attended scores are pooled: LogSumExp (default) or AVG (mean)")
    model.add_argument("--uni-gru", dest="bidirectional", action="store_false", default=None,
                       help="a one-directional GRU text encoder (default: bidirectional)")
    model.add_argument("--lambda-softmax", type=float,
                       help="attention temperature (default: 9 for t2i, 4 for i2t)")
    model.add_argument("--lambda-lse", type=float, help="LogSumExp sharpness (default 6)")
    model.add_argument("--margin", type=float, help="triplet loss margin (default 0.2)")
    model.add_argument("--no-max-violation", dest="max_violation", action="store_false",
                       default=None, help="sum over all negatives instead of the hardest one")
    model.add_argument("--warmup-epochs", type=int,
                       help="sum over all negatives for this many epochs before switching to "
                            "the hardest one (VSE++'s warm-up; default 0)")
    model.add_argument("--text-encoder", choices=("gru", "minilm"),
                       help="gru: a GRU over the collection's vocabulary, trained with SCAN "
                            "(default); minilm: the pretrained all-MiniLM-L6-v2, frozen, with a "
                            "trained projection: reads words the collection never used")
    model.add_argument("--minilm-head", choices=("linear", "words", "gru"),
                       help="minilm: how its word features enter the joint space: words: with a "
                            "trained code added per word of the collection's vocabulary (default; "
                            "tells rare catalogue words such as dates and names apart, other "
                            "words are still read through MiniLM); linear: a projection alone; "
                            "gru: beside a trained embedding per vocabulary word, read by a GRU "
                            "(--word-dim, --uni-gru apply)")
    model.add_argument("--word-dropout", type=float,
                       help="minilm heads words and gru: the share of known words trained as "
                            "if outside the vocabulary, read through MiniLM alone (default 0.5)")
    model.add_argument("--embed-dim", type=int, help="joint embedding size (default 1024)")
    model.add_argument("--word-dim", type=int, help="word embedding size (default 300)")
    model.add_argument("--pooled-weight", type=float,
                       help="weight of the first-stage pooled-vector loss (default 1)")
    model.add_argument("--xattn-weight", type=float,
                       help="weight of the cross-attention loss (default 1); 0 with --pooled-weight 1 "
                            "trains a vectors-only baseline, selected by its pooled rsum")
    model.add_argument("--negatives", type=int,
                       help="fine grain with boxes: negative fragments per artwork of a batch, "
                            "its whole image and N-1 detected fragments that miss the phrase's "
                            "box (default 3; 0 trains on annotated pairs alone)")
    optim = train.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="epochs (default 30)")
    optim.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    optim.add_argument("--lr-update", type=int,
                       help="divide the learning rate by 10 after this many epochs (default 15)")
    optim.add_argument("--grad-clip", type=float,
                       help="max gradient norm, 0 to switch off (default 2)")
    optim.add_argument("--batch-size", type=int, help="pairs per batch (default 128)")
    optim.add_argument("--seed", type=int, help="random seed (default 0)")
    optim.add_argument("--val-split", choices=("val", "test"), help="validation split (default val)")
    optim.add_argument("--device", help="torch device, e.g. cpu or cuda (default cpu)")
    optim.add_argument("--resume", action="store_true", default=None,
                       help="continue from OUT's .resume.pt training state")
    optim.add_argument("--threads", type=int, default=0,
                       help="CPU threads for torch (default: torch's choice, one per core); on a "
                            "machine shared with other work 1 is often many times faster")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="recall of a SCAN checkpoint on a split (exhaustive, two-stage, pooled)",
        description=(
            "Evaluate a SCAN checkpoint on one split of a collection.\n"
            "  coarse: image annotation / image retrieval R@1,5,10, rsum, median rank\n"
            "  fine:   crop -> phrase and phrase -> fragment (IoU >= 0.5) R@1,5,10, and\n"
            "          grounding R@1 within the artwork\n"
            "Each is scored by exhaustive SCAN, by the two-stage path (pooled-vector top-K,\n"
            "then SCAN rerank) and by pooled vectors alone.  --grid retrains the thesis's five\n"
            "model variants with the checkpoint's other options and prints one table."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="a SCAN checkpoint")
    evaluate.add_argument("--collection", type=Path, required=True, help="the collection folder")
    evaluate.add_argument("--features", type=Path,
                          help="feature store folder (default: COLLECTION/features)")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test",
                          help="split to evaluate (default test)")
    evaluate.add_argument("--grain", choices=("coarse", "fine"),
                          help="override the grain the checkpoint was trained for")
    evaluate.add_argument("--candidates", type=int, default=100,
                          help="first-stage candidates per query, K (default 100)")
    evaluate.add_argument("--json", type=Path, help="also write the figures as JSON here")
    evaluate.add_argument("--queries", type=Path, metavar="FILE",
                          help='phrase -> fragment with your own wording: JSON lines '
                               '{"query": "golden birds", "phrase": "two gold birds"} (optional '
                               '"kind"); each query is scored in place of its annotated phrase, '
                               "a hit overlaps that phrase's box (IoU >= 0.5)")
    evaluate.add_argument("--grid", action="store_true",
                          help="train and evaluate the five Table 4.1 variants (slow)")
    evaluate.add_argument("--grid-epochs", type=int,
                          help="epochs per grid variant (default: as the checkpoint was trained)")
    evaluate.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evaluate.add_argument("--threads", type=int, default=0,
                          help="CPU threads for torch (default: one per core)")
    evaluate.set_defaults(handler=run_evaluate)


def _train_options(args: argparse.Namespace):
    from training.train import TrainOptions

    values = dict(PRESETS[args.preset]) if args.preset else {}
    for name in ("collection", "features", "grain", "supervision", "out", "direction", "agg",
                 "bidirectional", "lambda_softmax", "lambda_lse", "margin", "max_violation", "warmup_epochs",
                 "embed_dim", "word_dim", "text_encoder", "minilm_head", "word_dropout", "pooled_weight", "xattn_weight", "negatives", "epochs", "lr", "lr_update",
                 "grad_clip", "batch_size", "seed", "val_split", "device", "resume"):
        value = getattr(args, name)
        if value is not None:
            values[name] = str(value) if isinstance(value, Path) else value
    missing = [f"--{name}" for name in ("collection", "out") if name not in values]
    if missing:
        raise ValueError(f"{' and '.join(missing)} needed (or --preset demo)")
    return TrainOptions(**values)


def _set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def run_train(args: argparse.Namespace) -> int:
    from training.train import train

    _set_threads(args.threads)
    result = train(_train_options(args))
    print(f"best epoch {result.best_epoch}: validation rsum {result.best_rsum:.1f}; "
          f"wrote {result.checkpoint} (model version {result.model_version[:12]})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, format_result
    from training.grid import format_grid, run_grid

    _set_threads(args.threads)
    if args.queries is not None:
        from training.queries import evaluate_queries, format_queries

        result = evaluate_queries(args.checkpoint, args.collection, args.queries,
                                  features=args.features, split=args.split, k=args.candidates,
                                  device=args.device)
        print(format_queries(result))
    elif args.grid:
        result = run_grid(args.checkpoint, args.collection, features=args.features,
                          split=args.split, k=args.candidates, epochs=args.grid_epochs,
                          device=args.device)
        print(format_grid(result))
    else:
        result = evaluate(args.checkpoint, args.collection, features=args.features,
                          split=args.split, k=args.candidates, grain=args.grain,
                          device=args.device)
        print(format_result(result))
    if args.json:
        from index.atomic import write_text_atomic
        from training.evaluate import plain_json

        text = json.dumps(plain_json(result), indent=1)
        write_text_atomic(args.json, text)
        log.info("wrote %s", args.json)
    return 0
