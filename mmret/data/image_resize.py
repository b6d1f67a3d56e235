"""Decode, pre-resize and JPEG-encode one image: the per-sample work `mmret shards` spreads over processes.

Two geometries, both giving an exactly `size`×`size` RGB image:

- `center_crop` (default): scale so the shorter side is `size`, keep the central square. What CLIP-style
  preprocessing does at training time anyway, so nothing the model would see is lost.
- `pad`: scale so the longer side is `size`, centre it on a black square. Keeps the whole image (text, charts,
  wide panoramas) at the cost of black bands.

    from mmret.data.image_resize import decode_image, resize_image, encode_jpeg
    jpeg = encode_jpeg(resize_image(decode_image(path), 224, "center_crop"), quality=95)

Pure functions of their inputs: the same image, size and mode always give the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("center_crop", "pad")
# Bicubic is what open_clip's preprocessing uses; resizing with it here keeps train-time statistics familiar.
RESAMPLE = Image.Resampling.BICUBIC


class ImageDecodeError(Exception):
    """The bytes are not an image PIL can fully decode (garbage, truncated, unsupported)."""


def decode_image(source: str | Path | bytes, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode an image from a path or encoded bytes, as RGB with EXIF rotation applied.

    Args:
        source: a file path or the encoded bytes of an image.
        draft_size: when given, let the JPEG decoder downscale by a power of two while keeping both sides
            >= this size; decoding a 4000 px photo for a 224 px shard is then several times faster.

    Raises:
        FileNotFoundError / PermissionError / IsADirectoryError: the path cannot be read.
        ImageDecodeError: the content is not a decodable image.
    """
    if isinstance(source, (str, Path)):
        # Read first so that a missing or unreadable file is told apart from undecodable content.
        source = Path(source).read_bytes()
    try:
        image = Image.open(io.BytesIO(source))
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    # Decoders signal bad data through many exception types; any of them means this sample is unusable.
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{type(err).__name__}: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white (how viewers show them)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's direct convert clips at 255, so rescale the range to 8 bits first.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        return Image.fromarray((array * (255.0 / peak)).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, size: int, mode: str = "center_crop") -> Image.Image:
    """Resize an RGB image to exactly `size`×`size` pixels.

    Args:
        image: the decoded image (any size).
        size: the side of the output square, > 0.
        mode: "center_crop" (shorter side to `size`, central square) or "pad" (longer side to `size`,
            centred on black).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    image = to_rgb(image)
    width, height = image.size
    if (width, height) == (size, size):
        return image.copy()
    if mode == "center_crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        # Resampling straight from the crop box in source coordinates avoids a second interpolation
        # and keeps sub-pixel centring for odd differences.
        return image.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))
    scale = size / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(
        image.resize((new_width, new_height), RESAMPLE), ((size - new_width) // 2, (size - new_height) // 2)
    )
    return canvas


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    """Encode an RGB image as baseline JPEG bytes (no EXIF, deterministic for the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
