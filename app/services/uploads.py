"""Uploaded image files, decoded and checked in one place for every route that takes one
(/artworks through ingestion, /annotate through retrieval)."""

from __future__ import annotations

from PIL import Image

from collection.images import load_image


def decode_upload(image_bytes: bytes, *, name: str, max_pixels: int | None = None) -> Image.Image:
    """The upload as an upright 8-bit RGB image; ImageError names ``name`` and what is wrong.
    ``max_pixels`` None keeps load_image's own limit."""
    return load_image(image_bytes, name=name, **({"max_pixels": max_pixels} if max_pixels else {}))
