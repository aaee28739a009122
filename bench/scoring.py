"""Cross-attention scoring speed: models.scan.xattn_similarity side by side with

  loop   the reference implementation's way (SCAN's xattn_score_*): a Python loop over the
         captions, each caption attending against all images at once;
  floor  the one matrix product of all regions against all words, which any exact
         implementation has to do; nothing can be much faster than it.

Same inputs for all three (random unit vectors, as the encoders produce), CPU, float32,
both directions. Each is timed several times, interleaved, and the best time is kept, so
that noise from other work on the machine hurts all three alike.

    python -m bench.scoring [--images 400 --regions 36 --texts 400 --min-words 4 --max-words 12]
    artalign bench scoring --json scoring.json

torch is imported inside the functions so that ``artalign --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any

from bench.report import add_json_argument, publish, require_positive, run_as_main

log = logging.getLogger(__name__)

AGGREGATIONS = ("lse", "mean", "max", "sum")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=400, help="region sets (default 400)")
    parser.add_argument("--regions", type=int, default=36, help="regions per image (default 36)")
    parser.add_argument("--min-regions", type=int, default=None,
                        help="give images between this and --regions regions (default: all full)")
    parser.add_argument("--texts", type=int, default=400, help="word sequences (default 400)")
    parser.add_argument("--min-words", type=int, default=4, help="shortest text (default 4)")
    parser.add_argument("--max-words", type=int, default=12, help="longest text (default 12)")
    parser.add_argument("--dim", type=int, default=1024, help="embedding size d (default 1024)")
    parser.add_argument("--agg", choices=AGGREGATIONS, default="lse",
                        help="aggregation over query items (default lse)")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="images and texts per block in xattn_similarity (default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each implementation; the best counts (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the inputs")
    add_json_argument(parser)


def make_inputs(options: argparse.Namespace) -> dict[str, Any]:
    """Random unit rows, zero padded: what the encoders hand to the scorer."""
    import torch
    import torch.nn.functional as F

    if not 1 <= options.min_words <= options.max_words:
        raise ValueError(f"need 1 <= --min-words <= --max-words, got {options.min_words}, {options.max_words}")
    min_regions = options.min_regions or options.regions
    if not 1 <= min_regions <= options.regions:
        raise ValueError(f"need 1 <= --min-regions <= --regions, got {min_regions}, {options.regions}")
    generator = torch.Generator().manual_seed(options.seed)
    image_lens = torch.randint(min_regions, options.regions + 1, (options.images,), generator=generator)
    text_lens = torch.randint(options.min_words, options.max_words + 1, (options.texts,),
                              generator=generator)
    images = F.normalize(torch.randn(options.images, options.regions, options.dim,
                                     generator=generator), dim=-1)
    texts = F.normalize(torch.randn(options.texts, options.max_words, options.dim,
                                    generator=generator), dim=-1)
    images *= (torch.arange(options.regions) < image_lens[:, None])[..., None]
    texts *= (torch.arange(options.max_words) < text_lens[:, None])[..., None]
    return dict(images=images, image_lens=image_lens, texts=texts, text_lens=text_lens)


def _reference_attention(sims, query_mask, context_mask, lambda_softmax: float):
    """SCAN's func_attention with clipped_l2norm, plus masks for ragged sets.
    sims: (n, Q, C) query-context cosines; masks: (n, Q) / (n, C) bool or None.
    Returns α: (n, Q, C), a softmax over the context axis."""
    import torch.nn.functional as F

    attn = F.leaky_relu(sims, 0.1)
    if query_mask is not None:
        attn = attn * query_mask[:, :, None]
    attn = attn / (attn.norm(dim=1, keepdim=True) + 1e-8)  # L2 over the query axis
    attn = lambda_softmax * attn
    if context_mask is not None:
        attn = attn.masked_fill(~context_mask[:, None, :], float("-inf"))
    return attn.softmax(dim=2)


def _reference_aggregate(r, mask, agg: str, lambda_lse: float):
    """(n, Q) per-item cosines -> (n,); mask: (n, Q) bool or None (no padding)."""
    import torch

    if mask is not None:
        fill = float("-inf") if agg in ("lse", "max") else 0.0
        r = r.masked_fill(~mask, fill)
    if agg == "lse":
        return torch.logsumexp(lambda_lse * r, dim=1) / lambda_lse
    if agg == "max":
        return r.amax(dim=1)
    if agg == "sum":
        return r.sum(dim=1)
    return r.sum(dim=1) / (mask.sum(dim=1) if mask is not None else r.shape[1])


def reference_loop(images, image_lens, texts, text_lens, *, direction: str, agg: str,
                   lambda_softmax: float, lambda_lse: float = 6.0):
    """The reference implementation's shape of computation: one caption at a time, all
    images at once (SCAN's xattn_score_t2i / xattn_score_i2t). Returns (n_img, n_txt)."""
    import torch

    region_mask = torch.arange(images.shape[1]) < image_lens[:, None]  # (n_img, r)
    columns = []
    for caption, length in zip(texts, text_lens.tolist(), strict=True):
        caption = caption[:length]  # (w, d), shared by all images
        sims = images @ caption.T  # (n_img, r, w)
        if direction == "t2i":  # words attend to regions
            attn = _reference_attention(sims.transpose(1, 2), None, region_mask, lambda_softmax)
            queries, query_mask = caption, None
            attended = attn @ images  # (n_img, w, d)
        else:  # regions attend to words
            attn = _reference_attention(sims, region_mask, None, lambda_softmax)
            queries, query_mask = images, region_mask
            attended = attn @ caption  # (n_img, r, d)
        norms = (queries.norm(dim=-1) * attended.norm(dim=-1)).clamp_min(1e-8)
        r = (queries * attended).sum(dim=-1) / norms  # (n_img, Q)
        columns.append(_reference_aggregate(r, query_mask, agg, lambda_lse))
    return torch.stack(columns, dim=1)


def packed_rows(x, lens):
    """(n, L, d) zero padded -> (Σ lens, d): only the valid rows."""
    import torch

    return x[torch.arange(x.shape[1]) < lens[:, None]]


def _best_times(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict]:
    """Best wall time of each run, the runs interleaved; plus each run's last result."""
    best = dict.fromkeys(runs, float("inf"))
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def run(options: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from models.scan import default_lambda_softmax, xattn_similarity

    if options.threads:
        torch.set_num_threads(options.threads)
    inputs = make_inputs(options)
    pairs = options.images * options.texts
    regions = packed_rows(inputs["images"], inputs["image_lens"])  # (Σ r, d)
    words = packed_rows(inputs["texts"], inputs["text_lens"])  # (Σ w, d)
    report: dict[str, Any] = {
        "benchmark": "scoring",
        "sizes": {"images": options.images, "regions": options.regions,
                  "min_regions": options.min_regions or options.regions, "texts": options.texts,
                  "words": [options.min_words, options.max_words], "dim": options.dim,
                  "agg": options.agg, "chunk_size": options.chunk_size},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "load": os.getloadavg()},
        "repeats": options.repeats,
        "directions": {},
    }
    with torch.inference_mode():
        for direction in tqdm(("t2i", "i2t"), desc="directions", unit="direction"):
            scoring = dict(direction=direction, agg=options.agg,
                           lambda_softmax=default_lambda_softmax(direction))
            runs = {
                # all valid regions against all valid words: the work no exact method skips
                "floor": lambda: regions @ words.T,
                "xattn": lambda s=scoring: xattn_similarity(**inputs, **s,
                                                            chunk_size=options.chunk_size),
                "loop": lambda s=scoring: reference_loop(**inputs, **s),
            }
            times, results = _best_times(runs, options.repeats)
            diff = (results["xattn"] - results["loop"]).abs().max().item()
            report["directions"][direction] = {
                "seconds": times,
                "pairs_per_second": {name: pairs / t for name, t in times.items()},
                "speedup_over_loop": times["loop"] / times["xattn"],
                "times_floor": times["xattn"] / times["floor"],
                "max_abs_diff_vs_loop": diff,
            }
            log.info("%s: xattn %.3fs, loop %.3fs, floor %.3fs, max |diff| %.2e", direction,
                     times["xattn"], times["loop"], times["floor"], diff)
    return report


def format_table(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    lines = [
        f"{sizes['images']} images x {sizes['regions']} regions, {sizes['texts']} texts x "
        f"{sizes['words'][0]}-{sizes['words'][1]} words, d={sizes['dim']}, agg={sizes['agg']}, "
        f"{report['machine']['threads']} threads, best of {report['repeats']}",
        f"{'direction':<9} {'impl':<6} {'seconds':>9} {'pairs/s':>12} {'vs loop':>8} "
        f"{'/ floor':>8} {'max|diff|':>10}",
    ]
    for direction, result in report["directions"].items():
        for name in ("xattn", "loop", "floor"):
            seconds = result["seconds"][name]
            speedup = result["seconds"]["loop"] / seconds
            over_floor = seconds / result["seconds"]["floor"]
            diff = f"{result['max_abs_diff_vs_loop']:.2e}" if name == "xattn" else ""
            lines.append(f"{direction:<9} {name:<6} {seconds:>9.3f} "
                         f"{result['pairs_per_second'][name]:>12,.0f} {speedup:>7.1f}x "
                         f"{over_floor:>7.2f}x {diff:>10}")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    """Run the benchmark, print the table and the JSON; write the JSON if asked."""
    require_positive(options, "images", "regions", "texts", "dim", "chunk_size", "repeats")
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.scoring", __doc__, add_arguments, main)
