"""Dataset loaders: Fashion-MNIST IDX files, CIFAR-10 python batches, `.npz` archives, and image
folders (one sub-folder per class, PNG/JPEG/WebP decoded with Pillow).

Every loader returns a `Dataset` of uint8 images in N×C×H×W layout and int64 labels; conversion
to floats in [0, 1] happens once, in `unit_floats` (`Dataset.float_images`), so no loader can
disagree about scale.
Missing or malformed files raise `DataError` with a message that says what is wrong and how to
get the data.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from PIL import Image

Split = Literal["train", "test"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Where Debian's `dataset-fashion-mnist` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR_ENV = "MARGINWATCH_FASHION_MNIST_DIR"
SHIPPED_SUBSET = Path(__file__).parent / "datasets" / "fashion-mnist-test-subset.npz"

_HOW_TO_GET_FASHION_MNIST = (
    "Install Debian's package (`apt-get install dataset-fashion-mnist`), or pass the folder "
    f"holding the IDX files with --data-dir or the {FASHION_MNIST_DIR_ENV} environment variable."
)
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class DataError(Exception):
    """Data that is missing, truncated or not in the expected format."""


def unit_floats(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 in [0, 1]: value / 255, the one scale of every loader (and of the
    service's image requests)."""
    return pixels.astype(np.float32) / 255.0


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 N×C×H×W, labels as int64 N, and the class names in label order."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be N×C×H×W, got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{len(self.images)} images but {len(self.labels)} labels: the files do not match"
            )
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise DataError(
                f"labels must lie in [0, {len(self.class_names) - 1}], "
                f"found [{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def float_images(self) -> np.ndarray:
        """Images as float32 in [0, 1], the input range of every model here."""
        return unit_floats(self.images)

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.images[indices], self.labels[indices], self.class_names)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (raw or gzip), checking its magic number and its length."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as error:
        raise DataError(f"{path} does not exist. {_HOW_TO_GET_FASHION_MNIST}") from error
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path} is a damaged gzip file ({error}); fetch it again") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} is truncated or padded: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def fashion_mnist_dir(data_dir: Path | None = None) -> Path:
    """The folder to read Fashion-MNIST from: argument, then environment, then Debian's."""
    if data_dir is not None:
        return Path(data_dir)
    from_env = os.environ.get(FASHION_MNIST_DIR_ENV)
    return Path(from_env) if from_env else DEBIAN_FASHION_MNIST_DIR


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise DataError(f"no {stem}(.gz) in {folder}. {_HOW_TO_GET_FASHION_MNIST}")


def load_fashion_mnist(split: Split, data_dir: Path | None = None) -> Dataset:
    """The full Fashion-MNIST train (60,000) or test (10,000) split from IDX files."""
    folder = fashion_mnist_dir(data_dir)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(
            f"Fashion-MNIST images must be uint8 N×28×28, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"Fashion-MNIST labels must be a vector, got shape {labels.shape}")
    return Dataset(images[:, None].copy(), labels.astype(np.int64), FASHION_MNIST_CLASSES)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles; allow only what rebuilds numpy arrays, nothing executable."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError as error:
        raise DataError(
            f"{path} does not exist: pass the `cifar-10-batches-py` folder with --data-dir"
        ) from error
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 python batch: no b'data' and b'labels' keys")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be N×3072 uint8, got shape {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(split: Split, data_dir: Path) -> Dataset:
    """CIFAR-10 in its standard python format (`data_batch_1..5`, `test_batch`)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(Path(data_dir) / name) for name in names]
    return Dataset(
        np.concatenate([images for images, _ in parts]),
        np.concatenate([labels for _, labels in parts]),
        CIFAR10_CLASSES,
    )


def load_npz(path: Path, class_names: tuple[str, ...] | None = None) -> Dataset:
    """An `.npz` with `images` (uint8 N×C×H×W, or N×H×W) and `labels`; `class_names` optional
    (`class_names` given here replace the archive's; without either, the labels' digits)."""
    images, labels, stored = _read_npz(path)
    return Dataset(images, labels, class_names or stored or _digit_names(labels))


def _digit_names(labels: np.ndarray) -> tuple[str, ...]:
    return tuple(str(i) for i in range(int(labels.max()) + 1 if labels.size else 0))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Images (N×C×H×W), labels and, when the archive has them, its class names."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError as error:
        raise DataError(f"{path} does not exist") from error
    except (ValueError, OSError) as error:
        raise DataError(f"{path} is not a readable .npz archive: {error}") from error
    missing = {"images", "labels"} - arrays.keys()
    if missing:
        raise DataError(f"{path} lacks the arrays {sorted(missing)} (has {sorted(arrays)})")
    images = arrays["images"]
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    names = None
    if "class_names" in arrays:
        names = tuple(str(name) for name in arrays["class_names"])
    return images, arrays["labels"].astype(np.int64), names


def save_npz(dataset: Dataset, path: Path) -> None:
    np.savez_compressed(
        path,
        images=dataset.images,
        labels=dataset.labels,
        class_names=np.array(dataset.class_names),
    )


def stratified_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices with every class as equally represented as `size` allows, sorted."""
    if size > len(labels):
        raise DataError(f"asked for {size} samples but the split has only {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    chosen: list[int] = []
    round_index = 0
    while len(chosen) < size:
        for members in per_class:
            if round_index < len(members) and len(chosen) < size:
                chosen.append(int(members[round_index]))
        round_index += 1
    return np.sort(np.array(chosen, dtype=np.int64))


# Image folders. The extensions read, and the only decoders Pillow may use for them: a file is
# decoded by its content, so restricting the formats also keeps a GIF or TIFF renamed `.png`
# (and the decoders of formats nobody asked for) out. The service's image requests
# (`service/images.py`) take the same formats and decode them with the functions below.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# How an image is resized to a requested size (aspect ratio not kept). Pillow's bilinear filter
# widens its support when it shrinks, so a downscaled image is averaged, not aliased.
RESAMPLING = Image.Resampling.BILINEAR
# Pillow modes read as 8-bit grayscale; the other 8-bit modes are converted to RGB. Alpha is
# dropped, as Pillow's `convert` (and torchvision's loader) do: models here see no transparency.
_GRAY_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
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


def image_pixels(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """An open image's pixels as uint8 H×W (grayscale mode) or H×W×3 (every other 8-bit mode, as
    RGB; alpha dropped), resized to `size` (height, width) with `RESAMPLING` if given and
    different. Animated and 16-bit or float images raise `DataError`, whose message continues
    the name of the image ("… is animated"); a damaged file raises Pillow's own errors (many
    types), for the caller to name."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise DataError(f"is animated ({frames} frames); use still images")
    if image.mode not in _GRAY_MODES | _COLOUR_MODES:
        raise DataError(
            f"has pixel mode {image.mode} (16-bit or float): save it as 8-bit grayscale or RGB"
        )
    converted = image.convert("L" if image.mode in _GRAY_MODES else "RGB")
    if size is not None and converted.size != size[::-1]:
        converted = converted.resize(size[::-1], RESAMPLING)
    return np.asarray(converted)


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image file as `image_pixels` gives it; any problem is a `DataError` naming the file."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            return image_pixels(image, size)
    except DataError as error:
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
    then each is resized to it (`RESAMPLING`: bilinear, aspect ratio not kept). Channels: 1 when
    every image is gray (modes 1/L/LA, or RGB/palette content with equal channels), else 3, every
    gray image repeated into R = G = B; `channels` forces 1 (colour → luma) or 3. Alpha is
    dropped; EXIF orientation is not applied (pixels as stored); animated and 16-bit images are
    refused.
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


DATASETS = ("fashion-mnist", "fashion-mnist-subset", "cifar10")


def load_dataset(
    name: str,
    split: Split,
    data_dir: Path | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> Dataset:
    """A dataset by name (see `DATASETS`), by the path of an `.npz` file, or by the path of an
    image folder (`load_image_folder`). Names win: write `./cifar10` for a folder of that name.

    `class_names` is the model's label order: label i is the class named i-th. Where the data
    names its classes (the named datasets, an image folder's class folders, an `.npz` with
    `class_names`), it must name each of them once, and the labels are renumbered to it; an
    `.npz` without names takes them as its names."""
    if name.endswith(".npz") and not Path(name).is_dir():
        images, labels, stored = _read_npz(Path(name))
        if stored is None and class_names is not None:
            return _named(images, labels, tuple(class_names), name)
        data = Dataset(images, labels, stored or _digit_names(labels))
    else:
        data = _load_named_classes(name, split, data_dir)
    return data if class_names is None else in_class_order(data, tuple(class_names), name)


def _load_named_classes(name: str, split: Split, data_dir: Path | None) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "fashion-mnist-subset":
        if split != "test":
            raise DataError("the shipped Fashion-MNIST subset holds test images only")
        return load_npz(SHIPPED_SUBSET, FASHION_MNIST_CLASSES)
    if name == "cifar10":
        if data_dir is None:
            raise DataError("CIFAR-10 needs --data-dir: the `cifar-10-batches-py` folder")
        return load_cifar10(split, data_dir)
    if Path(name).is_dir():
        return load_image_folder(Path(name), split)
    raise DataError(
        f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, an .npz path, or an "
        "existing image folder (one sub-folder per class)"
    )


def has_train_split(name: str) -> bool:
    """Whether `name` holds a training split apart from its test split. An `.npz` is one file,
    which `load_dataset` answers for either split (so `marginwatch-train` can train on it); the
    shipped subset and an image folder without `train/` refuse `train` themselves."""
    return not (name.endswith(".npz") and not Path(name).is_dir())


def _named(images: np.ndarray, labels: np.ndarray, names: tuple[str, ...], source: str) -> Dataset:
    """Unnamed labels given names: enough of them for the largest label."""
    needed = int(labels.max()) + 1 if labels.size else 0
    if len(names) < needed:
        raise DataError(
            f"--class-names gives {len(names)} names, but the labels of {source} run to "
            f"{needed - 1}: give at least {needed}, in label order"
        )
    return Dataset(images, labels, names)


def in_class_order(data: Dataset, order: tuple[str, ...], source: str) -> Dataset:
    """`data` with its labels renumbered so that label i is the class named `order[i]`; `order`
    must name each of its classes once (an image folder's: each class folder)."""
    names = data.class_names
    listed = f"{len(names)} classes of {source} ({', '.join(names)})"
    if len(order) != len(names):
        raise DataError(
            f"--class-names gives {len(order)} names, but there are {len(names)}: name each "
            f"of the {listed} once, in the model's label order"
        )
    missing = [name for name in names if name not in order]
    unknown = [name for name in order if name not in names]
    if missing or unknown or len(set(order)) != len(order):
        problems = [f"not named: {', '.join(missing)}"] if missing else []
        problems += [f"unknown: {', '.join(unknown)}"] if unknown else []
        raise DataError(
            f"--class-names must name each of the {listed} once, in the model's label order"
            + (f" ({'; '.join(problems)})" if problems else " (a name repeats)")
        )
    renumber = np.array([order.index(name) for name in names], dtype=np.int64)
    return Dataset(data.images, renumber[data.labels], order)
