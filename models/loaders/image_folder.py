"""Image folders: one sub-folder per class (class names: the sub-folder names, sorted), PNG, JPEG
or WebP files in each, decoded by the pixel rules the service's image requests share
(`artifact/pixels.py`); `train/` and `test/` sub-folders, or one folder as the test split only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from marginwatch.artifact.pixels import (
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    PixelError,
    image_pixels,
    is_gray,
    to_channels,
)
from marginwatch.models.loaders.dataset import DataError, Dataset, Split

_SPLIT_FOLDERS = ("train", "test")


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder` in name order, without hidden ones (`.DS_Store`, `.git`)."""
    try:
        entries = list(folder.iterdir())
    except OSError as error:
        raise DataError(f"cannot list {folder}: {error}") from error
    visible = [entry for entry in entries if not entry.name.startswith(".")]
    return sorted(visible, key=lambda entry: entry.name)


def _class_folders(folder: Path) -> list[Path]:
    """The class sub-folders of `folder`, sorted by name; files beside them are ignored."""
    classes = [entry for entry in _visible(folder) if entry.is_dir()]
    if len(classes) < 2:
        raise DataError(
            f"image folder {folder} has {len(classes)} class sub-folder(s); a classifier needs "
            "at least 2: put each class's images in a sub-folder named after the class"
        )
    return classes


def _image_files(class_folder: Path) -> list[Path]:
    """The images of one class. Anything else is refused rather than skipped, so that a class
    never silently loses files (a `.gif`, a nested folder); hidden files are ignored."""
    files = _visible(class_folder)
    for entry in files:
        if entry.is_dir():
            raise DataError(f"{entry}: nested folders are not read; move its images up a level")
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{entry}: not an image file of this loader (extensions "
                f"{', '.join(IMAGE_SUFFIXES)}); convert or remove it"
            )
    if not files:
        raise DataError(f"class folder {class_folder} holds no images")
    return files


def image_split_folder(root: Path, split: Split) -> Path:
    """The folder whose sub-folders are the classes of `split`.

    `root/train/<class>/` and `root/test/<class>/` (either or both) hold one split each, and
    must then have the same classes, so that a label means one class in both. A folder whose
    sub-folders are the classes themselves is one split, the test split: calibration draws the
    pseudo-margin's training points from the train split when there is one, so answering `train`
    with the same images would train on the points it is evaluated on.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    folders = [entry.name for entry in _visible(root) if entry.is_dir()]
    splits = [name for name in folders if name in _SPLIT_FOLDERS]
    if not splits:
        if split == "train":
            raise DataError(
                f"image folder {root} is one split, used as the test split (--split test); "
                "for a training split, lay it out as train/<class>/ and test/<class>/"
            )
        return root
    others = sorted(set(folders) - set(splits))
    if others:
        raise DataError(
            f"image folder {root} mixes split folders ({', '.join(splits)}) with other "
            f"sub-folders ({', '.join(others)}): put every class under train/ and test/, or "
            "rename a class called train or test"
        )
    if split not in splits:
        raise DataError(f"image folder {root} has no {split}/ sub-folder (only {splits[0]}/)")
    if len(splits) == 2:
        train, test = (
            [path.name for path in _class_folders(root / name)] for name in _SPLIT_FOLDERS
        )
        if train != test:
            raise DataError(
                f"image folder {root}: train/ and test/ must have the same class folders, "
                f"got {train} and {test}"
            )
    return root / split


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image file as `image_pixels` gives it; any problem is a `DataError` naming the file."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            return image_pixels(image, size)
    except PixelError as error:
        raise DataError(f"{path} {error}") from None
    except Exception as error:  # Pillow's decoders raise many types for one damaged file
        raise DataError(f"{path} is not a readable PNG, JPEG or WebP image: {error}") from error


def _header_size(path: Path) -> tuple[int, int]:
    """Height and width from the file's header, without decoding the pixels."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            return image.height, image.width
    except Exception as error:  # as in `_decode`: any reader failure means a bad file
        raise DataError(f"{path} is not a readable PNG, JPEG or WebP image: {error}") from error


def load_image_folder(
    root: Path,
    split: Split = "test",
    *,
    size: tuple[int, int] | None = None,
    channels: Literal[1, 3] | None = None,
) -> Dataset:
    """An image folder: one sub-folder per class (class names: the sub-folder names, sorted),
    PNG/JPEG/WebP images in each; `image_split_folder` says which folder answers `split`.

    Every image must have the same height and width, unless `size` (height, width) is given:
    then each is resized to it (`artifact.pixels.RESAMPLING`: bilinear, aspect ratio not kept).
    Channels: 1 when every image is gray (modes 1/L/LA, or RGB/palette content with equal
    channels), else 3, every gray image repeated into R = G = B; `channels` forces 1 (colour →
    luma) or 3. Alpha is dropped; EXIF orientation is not applied (pixels as stored); animated
    and 16-bit images are refused.
    """
    if size is not None and min(size) < 1:
        raise DataError(f"image size must be positive, got {size}")
    folder = image_split_folder(root, split)
    classes = _class_folders(folder)
    files = [(label, path) for label, cls in enumerate(classes) for path in _image_files(cls)]
    if size is None:
        # Headers first: a mismatched file is named before anything is decoded.
        first = files[0][1]
        expected = _header_size(first)
        for _, path in files[1:]:
            found = _header_size(path)
            if found != expected:
                raise DataError(
                    f"{path} is {found[0]}×{found[1]} (height×width) but {first} is "
                    f"{expected[0]}×{expected[1]}: every image must have the same size; "
                    "resize them first"
                )
    decoded = [_decode(path, size) for _, path in files]
    if channels is None:
        channels = 1 if all(is_gray(pixels) for pixels in decoded) else 3
    images = np.empty((len(decoded), channels, *decoded[0].shape[:2]), dtype=np.uint8)
    for index, pixels in enumerate(decoded):
        images[index] = to_channels(pixels, channels)
    labels = np.array([label for label, _ in files], dtype=np.int64)
    return Dataset(images, labels, tuple(cls.name for cls in classes))
