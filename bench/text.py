"""The text side's cost, GRU and MiniLM side by side: what a query costs, what the phrase
index costs, and what each way of training MiniLM would cost.

    python -m bench.text [--repeats 20 --threads 1 --json PATH]
    artalign bench text --collection var/egyptian

  query     for GRU-SCAN, MiniLM-SCAN (head "words") and MiniLM-SCAN with head "gru" ("minilm+gru"):
            one typed query -> the pooled vector the first stage searches with, as the
            service does it (app.services.query: the spaCy phrase split, then
            models.text.TextReader and the model's text encoder), one query at a time,
            MiniLM's per-text cache off; p50 and p95 over every query and repeat. The split
            is timed on its own too (it is the same for both encoders).
  index     every distinct phrase -> pooled vectors -> a FAISS index, as the service's
            phrase index build does it (batches of 512): seconds and phrases per second.
  training  one batch of --batch phrases through the text side, forward and backward, as
            a training step would: the trained head alone on cached MiniLM outputs (what
            `--text-encoder minilm` does; head "words", and head "gru": MiniLM's
            features beside vocabulary embeddings, read by a GRU), frozen MiniLM read afresh every batch, MiniLM's
            top layer fine-tuned, all of MiniLM fine-tuned; and the GRU. Seconds per batch,
            and per epoch of --pairs pairs.

The models are the demo recipe's sizes (d=256, word_dim 128), freshly initialised: speed does
not depend on the weights. Phrases come from --collection (its artworks' phrases), or from the
synthetic grammar (colour x motif x count: 360 phrases).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.report import add_json_argument, publish, require_positive, run_as_main

log = logging.getLogger(__name__)

QUERIES = ("golden birds", "two gold birds", "blue fish on a red cup", "a hawk", "gilded vessel",
           "porcelain stem cup with polychrome overglaze enamels", "lady with a fan",
           "three turquoise dragons among clouds", "scarab", "inscription band on a limestone stela")
# text sides compared: name -> (ScanConfig.text_encoder, ScanConfig.minilm_head)
ENCODERS = {"gru": ("gru", "words"), "minilm": ("minilm", "words"), "minilm+gru": ("minilm", "gru")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--collection", type=Path, default=None,
                        help="take the phrases from this collection (default: the synthetic grammar)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="times each of the built-in queries is encoded (default %(default)s)")
    parser.add_argument("--batch", type=int, default=128,
                        help="phrases per training batch (default %(default)s, the demo recipe)")
    parser.add_argument("--pairs", type=int, default=3700,
                        help="training pairs per epoch, for the per-epoch column (default %(default)s, "
                             "the synthetic fine grain)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default %(default)s: the service's per-request budget)")
    add_json_argument(parser)


def _phrases(collection: Path | None) -> list[str]:
    if collection is not None:
        from collection.layout import Collection

        artworks = Collection.load(collection).artworks
        return list(dict.fromkeys(p for a in artworks for p in a.phrases))
    from collection.synth import COLOURS, COUNT_WORDS, MOTIFS

    return [f"{COUNT_WORDS[n] + ' ' if n > 1 else ''}{c} {m.name if n == 1 else m.plural}"
            for c in COLOURS for m in MOTIFS for n in COUNT_WORDS]


def _model(name: str, vocab):
    from models.scan import SCAN, ScanConfig
    from models.text import TextReader, minilm_weights_sha256

    encoder, head = ENCODERS[name]
    config = ScanConfig(vocab_size=len(vocab), embed_dim=256, word_dim=128, text_encoder=encoder,
                        minilm_head=head,
                        minilm_sha256=minilm_weights_sha256() if encoder == "minilm" else None)
    return SCAN(config).eval(), TextReader(config.text_encoder, vocab, cache_size=0)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "n": len(ms)}


def _time_queries(model, reader, repeats: int) -> tuple[dict, dict]:
    import torch

    from app.services.query import parse_query
    from models.scan import pooled

    split, whole = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            for query in QUERIES:
                start = time.perf_counter()
                parsed = parse_query(query, reader)
                split.append(time.perf_counter() - start)
                inputs, lens = reader.batch(parsed.tokens)
                pooled(model.encode_texts(inputs, lens), lens)
                whole.append(time.perf_counter() - start)
    return _percentiles(whole), _percentiles(split)


def _time_index(model, reader, phrases: list[str]) -> dict[str, Any]:
    import numpy as np
    import torch

    from index.vectors import VectorIndex
    from models.scan import pooled

    start = time.perf_counter()
    vectors = []
    with torch.inference_mode():
        for first in range(0, len(phrases), 512):
            inputs, lens = reader.batch([reader.tokens(p) for p in phrases[first:first + 512]])
            vectors.append(pooled(model.encode_texts(inputs, lens), lens).numpy())
    VectorIndex.build(np.arange(len(phrases), dtype=np.int64), np.concatenate(vectors), dim=256)
    seconds = time.perf_counter() - start
    return {"phrases": len(phrases), "seconds": seconds, "phrases_per_second": len(phrases) / seconds}


def _time_training(phrases: list[str], vocab, batch: int) -> dict[str, float]:
    """Seconds of one text-side forward + backward on ``batch`` phrases, per way of training."""

    from models.text import minilm

    texts = [phrases[i % len(phrases)].split() for i in range(batch)]
    backbone = minilm()
    encoded = backbone.tokenizer(texts, is_split_into_words=True, padding=True, return_tensors="pt")
    gru, gru_reader = _model("gru", vocab)
    head, reader = _model("minilm", vocab)
    gru_head, _ = _model("minilm+gru", vocab)
    cached, lens = reader.batch(texts)
    ids, id_lens = gru_reader.batch(texts)
    layers = backbone.model.encoder.layer

    def step(forward) -> float:
        start = time.perf_counter()
        forward().sum().backward()
        return time.perf_counter() - start

    def fine_tune(top: int):
        def forward():
            for number, layer in enumerate(layers):
                layer.requires_grad_(number >= len(layers) - top)
            try:
                return backbone.model(**encoded).last_hidden_state
            finally:
                backbone.model.requires_grad_(False)
        return forward

    runs = {
        "gru": lambda: gru.encode_texts(ids, id_lens),
        "minilm cached (trained head only)": lambda: head.encode_texts(cached, lens),
        "minilm cached, head gru": lambda: gru_head.encode_texts(cached, lens),
        "minilm frozen, read every batch": lambda: head.encode_texts(*reader.batch(texts)),
        "minilm, top layer fine-tuned": fine_tune(1),
        "minilm, all layers fine-tuned": fine_tune(len(layers)),
    }
    return {name: min(step(run) for _ in range(3)) for name, run in runs.items()}


def run(options: argparse.Namespace) -> dict[str, Any]:
    import torch

    from models.vocab import Vocabulary, tokenize

    torch.set_num_threads(options.threads)
    phrases = _phrases(options.collection)
    vocab = Vocabulary.build(tokenize(p) for p in phrases)
    report: dict[str, Any] = {
        "benchmark": "text", "phrases_from": str(options.collection or "synthetic grammar"),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "load": os.getloadavg()},
        "query": {}, "index": {},
    }
    for encoder in ENCODERS:
        model, reader = _model(encoder, vocab)
        _time_queries(model, reader, 1)  # warm up: spaCy and MiniLM load on first use
        report["query"][encoder], report["query_split"] = _time_queries(model, reader, options.repeats)
        report["index"][encoder] = _time_index(model, reader, phrases)
        log.info("%s: query p95 %.1f ms, %d phrases indexed in %.1f s", encoder,
                 report["query"][encoder]["p95_ms"], len(phrases), report["index"][encoder]["seconds"])
    per_batch = _time_training(phrases, vocab, options.batch)
    batches = -(-options.pairs // options.batch)
    report["training"] = {"batch": options.batch, "pairs": options.pairs,
                          "seconds_per_batch": per_batch,
                          "seconds_per_epoch": {k: v * batches for k, v in per_batch.items()}}
    return report


def format_table(report: dict[str, Any]) -> str:
    query, index = report["query"], report["index"]
    split = report["query_split"]
    lines = [f"{report['machine']['threads']} thread(s), phrases from {report['phrases_from']}",
             f"{'':<10} {'query p50 ms':>12} {'p95 ms':>8} {'phrases':>8} {'index s':>8} {'phrases/s':>10}"]
    for encoder in ENCODERS:
        lines.append(f"{encoder:<10} {query[encoder]['p50_ms']:>12.1f} {query[encoder]['p95_ms']:>8.1f} "
                     f"{index[encoder]['phrases']:>8} {index[encoder]['seconds']:>8.2f} "
                     f"{index[encoder]['phrases_per_second']:>10.0f}")
    lines.append(f"(of which the phrase split: p50 {split['p50_ms']:.1f} ms, p95 {split['p95_ms']:.1f} ms)")
    training = report["training"]
    lines.append(f"training, text side forward + backward, {training['batch']} phrases per batch, "
                 f"{training['pairs']} pairs per epoch:")
    for name, seconds in training["seconds_per_batch"].items():
        lines.append(f"  {name:<36} {seconds:>7.3f} s/batch {training['seconds_per_epoch'][name]:>8.1f} s/epoch")
    return "\n".join(lines)


def main(options: argparse.Namespace) -> int:
    require_positive(options, "repeats", "batch", "pairs", "threads")
    report = run(options)
    publish(report, format_table(report), options.json)
    return 0


if __name__ == "__main__":
    run_as_main("python -m bench.text", __doc__, add_arguments, main)
