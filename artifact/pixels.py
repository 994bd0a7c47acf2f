"""The pixel rules: how an image file becomes the float32 C×H×W input a model sees.

One set of rules for the calibration job's image folders (`models/loaders/image_folder.py`) and
the service's image requests (`service/images.py`), so that an image sent to the service and the
same file in a calibration folder are the same input to the model. It lives in the artifact
contract, the layer both sides import, and needs numpy and Pillow only (no torch).

The rules: PNG, JPEG and WebP only; 8-bit grayscale modes read as gray, every other 8-bit mode as
RGB, alpha dropped; gray repeated into RGB, or colour to luma, as the model's channels need;
resized (bilinear, aspect ratio not kept) where a size is asked for; values / 255.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from PIL import Image

# The extensions read, and the only decoders Pillow may use for them: a file is decoded by its
# content, so restricting the formats also keeps a GIF or TIFF renamed `.png` (and the decoders of
# formats nobody asked for) out.
IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS: Final = ("PNG", "JPEG", "WEBP")
# How an image is resized to a requested size (aspect ratio not kept). Pillow's bilinear filter
# widens its support when it shrinks, so a downscaled image is averaged, not aliased.
RESAMPLING: Final = Image.Resampling.BILINEAR
# Pillow modes read as 8-bit grayscale; the other 8-bit modes are converted to RGB. Alpha is
# dropped, as Pillow's `convert` (and torchvision's loader) do: models here see no transparency.
_GRAY_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


class PixelError(ValueError):
    """An image these rules refuse (animated, 16-bit or float). The message continues the name
    of the image ("… is animated"), which the caller knows and puts in front."""


def unit_floats(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 in [0, 1]: value / 255, the one scale of every loader and of the
    service's image requests."""
    return pixels.astype(np.float32) / 255.0


def image_pixels(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """An open image's pixels as uint8 H×W (grayscale mode) or H×W×3 (every other 8-bit mode, as
    RGB; alpha dropped), resized to `size` (height, width) with `RESAMPLING` if given and
    different. Animated and 16-bit or float images raise `PixelError`; a damaged file raises
    Pillow's own errors (many types), for the caller to name."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise PixelError(f"is animated ({frames} frames); use still images")
    if image.mode not in _GRAY_MODES | _COLOUR_MODES:
        raise PixelError(
            f"has pixel mode {image.mode} (16-bit or float): save it as 8-bit grayscale or RGB"
        )
    converted = image.convert("L" if image.mode in _GRAY_MODES else "RGB")
    if size is not None and converted.size != size[::-1]:
        converted = converted.resize(size[::-1], RESAMPLING)
    return np.asarray(converted)


def is_gray(pixels: np.ndarray) -> bool:
    """Gray content, whatever the mode: WebP has no grayscale mode, and many writers save gray
    images as RGB or with a palette; such images are read as grayscale too."""
    return pixels.ndim == 2 or bool(
        (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    )


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """`image_pixels`' H×W or H×W×3 as C×H×W with `channels` channels: gray is repeated into
    RGB; colour to gray is Pillow's ITU-R 601-2 luma, as `convert("L")` computes it."""
    if pixels.ndim == 3 and channels == 1:
        if is_gray(pixels):
            return pixels[None, ..., 0]
        return np.asarray(Image.fromarray(pixels).convert("L"))[None]
    if pixels.ndim == 2:
        return np.broadcast_to(pixels, (channels, *pixels.shape))
    return pixels.transpose(2, 0, 1)
