"""Images from the wild: real photographs and the awkward variants museums actually send."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collection.images import ImageError, load_image

DATA = Path(__file__).resolve().parents[2] / "shared/data/egyptian-cc0"
PHOTOS = sorted((DATA / "images-large").glob("*.jpg"))[:3]
needs_photos = pytest.mark.skipif(not PHOTOS, reason=f"real photographs not found under {DATA}/images-large")


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel value (0..255) of two same-sized RGB images."""
    assert a.size == b.size
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.fixture
def photo() -> Image.Image:
    if not PHOTOS:
        pytest.skip(f"real photographs not found under {DATA}/images-large")
    return load_image(PHOTOS[0])


@needs_photos
def test_real_photographs_load_as_rgb_from_path_and_bytes():
    for path in PHOTOS:
        image = load_image(path)
        assert image.mode == "RGB" and image.size == Image.open(path).size
        again = load_image(path.read_bytes(), name=path.name)
        assert difference(image, again) == 0


def test_exif_orientation_is_applied(photo, tmp_path):
    for orientation, stored in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                (3, Image.Transpose.ROTATE_180)):
        exif = Image.Exif()
        exif[0x0112] = orientation  # the camera was turned; viewers rotate back
        path = tmp_path / f"oriented-{orientation}.jpg"
        photo.transpose(stored).save(path, quality=95, exif=exif)
        upright = load_image(path)
        assert upright.size == photo.size
        assert difference(upright, photo) < 2  # only JPEG re-encoding noise (~0.8) left
    upside_down = photo.transpose(Image.Transpose.ROTATE_180)
    assert difference(upside_down, photo) > 5  # so the check above catches a missed rotation


def test_cmyk_jpeg_becomes_rgb(photo, tmp_path):
    path = tmp_path / "print.jpg"
    photo.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and difference(image, photo) < 6


def test_greyscale_and_16_bit_images(photo, tmp_path):
    grey = photo.convert("L")
    path = tmp_path / "grey.png"
    grey.save(path)
    image = load_image(path)
    array = np.asarray(image)
    assert image.mode == "RGB" and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    np.testing.assert_array_equal(array[..., 0], np.asarray(grey))

    # A 16-bit scan using only part of its range: scaled to 0..255, not clipped to white.
    deep = (np.asarray(grey, dtype=np.uint16) * 100 + 1000).astype(np.uint16)
    path16 = tmp_path / "scan16.png"
    Image.fromarray(deep).save(path16)
    assert Image.open(path16).mode.startswith("I;16")
    array16 = np.asarray(load_image(path16))[..., 0].astype(float)
    assert array16.min() == 0 and array16.max() == 255
    assert np.corrcoef(array16.ravel(), np.asarray(grey, dtype=float).ravel())[0, 1] > 0.99


def test_palette_and_alpha_images_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (200, 30, 30, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent
    path = tmp_path / "alpha.png"
    rgba.save(path)
    array = np.asarray(load_image(path))
    assert (array[:, :20] == 255).all() and (array[:, 20:] == [200, 30, 30]).all()

    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 10, 120, 200] + [0] * 762)
    palette.paste(0, (0, 0, 10, 30))
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)
    array = np.asarray(load_image(path))
    assert (array[:, :10] == 255).all() and (array[:, 10:] == [10, 120, 200]).all()

    grey_alpha = Image.new("LA", (10, 10), (50, 0))
    path = tmp_path / "la.png"
    grey_alpha.save(path)
    assert (np.asarray(load_image(path)) == 255).all()

    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (12, 12), colour) for colour in ("red", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    first = np.asarray(load_image(gif))
    assert first.shape == (12, 12, 3) and (first[..., 0] > 200).all()


def test_truncated_files_are_refused_clearly(photo, tmp_path):
    data = io.BytesIO()
    photo.save(data, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated image"):
        load_image(path)
    png = io.BytesIO()
    photo.save(png, format="PNG")
    with pytest.raises(ImageError, match="upload.png: corrupt or truncated image"):
        load_image(png.getvalue()[:-5000], name="upload.png")


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds only a few bytes of pixels: a
    decompression bomb is refused from the header, before any pixel is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_very_large_images_are_refused_before_decoding(tmp_path):
    # Past Pillow's own decompression-bomb limit Pillow refuses at open; below it, we do.
    with pytest.raises(ImageError, match=r"bomb\.png: image is too large to decode safely"):
        load_image(png_header_claiming(60000, 60000), name="bomb.png")
    with pytest.raises(ImageError, match=r"wide\.png: 8000x8000 = 64,000,000 pixels is over the limit of 50,000,000"):
        load_image(png_header_claiming(8000, 8000), name="wide.png")
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        load_image(png_header_claiming(40, 30), name="small.png", max_pixels=1000)
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), "white").save(big)
    with pytest.raises(ImageError, match=r"1200x1000 = 1,200,000 pixels is over the limit of 1,000,000; downscale"):
        load_image(big, max_pixels=1_000_000)
    assert load_image(big, max_pixels=1_200_000).size == (1200, 1000)


def test_non_images_and_unaccepted_formats_are_refused(tmp_path):
    with pytest.raises(ImageError, match="empty file"):
        load_image(b"")
    with pytest.raises(ImageError, match="notes.txt: not an image file"):
        load_image(b"hello, this is text", name="notes.txt")
    with pytest.raises(ImageError, match=r"missing\.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    ppm = tmp_path / "old.ppm"
    Image.new("RGB", (4, 4)).save(ppm)
    with pytest.raises(ImageError, match=r"old\.ppm: format PPM is not accepted \(use one of JPEG"):
        load_image(ppm)
    lab = tmp_path / "lab.tif"
    Image.new("LAB", (4, 4)).save(lab)
    image_or_error = None
    try:
        image_or_error = load_image(lab)
    except ImageError as exc:  # refusing is fine, as long as it is an ImageError naming the file
        assert "lab.tif" in str(exc)
    if image_or_error is not None:
        assert image_or_error.mode == "RGB"
