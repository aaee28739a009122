"""Decoding images from the wild into RGB, or refusing them with a message that says why.

Handles EXIF orientation, CMYK, greyscale, 16-bit, palette and alpha images. Refuses
corrupt or truncated files, non-images and images over a pixel limit *before* decoding
their pixels (no decompression bomb).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000
ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF")


class ImageError(ValueError):
    """An image that cannot be used; the message names the source and the reason."""


def load_image(
    source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into an upright 8-bit RGB image.

    Raises :class:`ImageError` naming ``name`` (or the path) when the data is not an image,
    is truncated or corrupt, has an unsupported format, or has more than ``max_pixels``.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded image")
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{label}: empty file")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.is_file():
            raise ImageError(f"{label}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            if image.format not in ACCEPTED_FORMATS:
                raise ImageError(
                    f"{label}: format {image.format} is not accepted "
                    f"(use one of {', '.join(ACCEPTED_FORMATS)})"
                )
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageError(f"{label}: image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(
                    f"{label}: {width}x{height} = {width * height:,} pixels is over the limit "
                    f"of {max_pixels:,}; downscale the image first"
                )
            image.load()  # decodes now, so truncation surfaces here, not later
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: image is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label}: not an image file, or a format that cannot be read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) 8-bit RGB; alpha is composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the real range to 0..255 rather than clipping it
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        # rint: truncating would turn the brightest value 254.99... into 254
        image = Image.fromarray(np.rint((array - low) * scale).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image
