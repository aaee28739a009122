"""What the model saw in a fragment: which regions each query word attended to, and the
words the detector's attribute head reads in the fragment's box.

Both come from what is stored: the attention from the fragment's encoded region set, the
attribute words from its box's raw feature (the head reads the representation that feature
holds), so nothing new is stored for either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from app.services.hits import AttendedRegion, AttributeScore, WordAttention

if TYPE_CHECKING:
    from models.regions import RegionExtractor

ATTRIBUTE_WORDS = 3  # the detector's words given per fragment, most probable first


def word_attention(image: torch.Tensor, texts: torch.Tensor, tokens: Sequence[Sequence[str]],
                   region_boxes: list[tuple[float, float, float, float]],
                   lambda_softmax: float) -> list[WordAttention]:
    """Per word of each query phrase in turn, the fragment's regions by the share of its
    attention, highest first. image: (r, d) region vectors; texts: (p, w, d) the phrases' word
    vectors (zero padded), tokens: the p phrases' words."""
    from models.scan import word_region_attention

    attention = []
    for text, words in zip(texts, tokens, strict=True):
        weights = word_region_attention(image, text[: len(words)], lambda_softmax)  # (w, r)
        for word, word_weights in zip(words, weights.float().cpu().tolist(), strict=True):
            ranked = sorted(zip(region_boxes, word_weights, strict=True), key=lambda bw: -bw[1])
            # a softmax share lies in [0, 1]; clip float rounding so the API's bounds hold
            attention.append(WordAttention(word, [AttendedRegion(tuple(b), min(1.0, max(0.0, w)))
                                                  for b, w in ranked]))
    return attention


def attribute_words(extractor: RegionExtractor | None, features: np.ndarray) -> list[list[AttributeScore]]:
    """Per box, from its raw region feature (n, D_raw), the detector's top attribute words with
    their probabilities; empty lists when there is no detector or it has no attribute head."""
    if extractor is None or not extractor.config.attribute_names or not len(features):
        return [[] for _ in range(len(features))]
    names = extractor.config.attribute_names
    scores = extractor.attribute_scores(features)  # (n, A)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :ATTRIBUTE_WORDS]
    return [[AttributeScore(names[j], float(row[j])) for j in best]
            for row, best in zip(scores, top, strict=True)]
