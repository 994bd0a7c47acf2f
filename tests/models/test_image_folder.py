"""The image-folder loader: layout, class order, size and channel rules, refusals, splits."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marginwatch.models.data import load_dataset
from marginwatch.models.loaders.dataset import DataError
from marginwatch.models.loaders.image_folder import load_image_folder

RNG = np.random.default_rng(0)
Encoded = np.ndarray | Image.Image  # what `write_image` saves


def write_image(path: Path, pixels: Encoded) -> Path:
    """Save uint8 H×W (gray) or H×W×3 (RGB) pixels, or a Pillow image, in the format of
    the suffix; WebP losslessly, so that the pixels read back are the ones written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    if path.suffix == ".webp":
        image.save(path, lossless=True)
    else:
        image.save(path)
    return path


def colour(height: int = 8, width: int = 6) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def gray(height: int = 8, width: int = 6) -> np.ndarray:
    return RNG.integers(0, 256, (height, width), dtype=np.uint8)


def two_classes(root: Path, suffix: str = ".png") -> None:
    for name in ("a", "b"):
        write_image(root / name / f"0{suffix}", colour())


def test_classes_are_sorted_folder_names_and_pixels_round_trip(tmp_path: Path) -> None:
    written = {
        ("zebra", "1.png"): colour(),
        ("zebra", "0.webp"): colour(),
        ("ant", "x.PNG"): colour(),  # extensions are matched case-insensitively
        ("moth", "b.png"): colour(),
        ("moth", "a.webp"): colour(),
    }
    for (cls, name), pixels in written.items():
        write_image(tmp_path / cls / name, pixels)
    data = load_image_folder(tmp_path)
    assert data.class_names == ("ant", "moth", "zebra")
    assert data.images.dtype == np.uint8 and data.images.shape == (5, 3, 8, 6)
    np.testing.assert_array_equal(data.labels, [0, 1, 1, 2, 2])
    order = [("ant", "x.PNG"), ("moth", "a.webp"), ("moth", "b.png"),
             ("zebra", "0.webp"), ("zebra", "1.png")]  # fmt: skip
    for index, key in enumerate(order):
        np.testing.assert_array_equal(data.images[index], written[key].transpose(2, 0, 1))


def test_jpeg_is_decoded(tmp_path: Path) -> None:
    pixels = np.full((8, 6, 3), (200, 40, 90), dtype=np.uint8)
    write_image(tmp_path / "a" / "0.jpg", pixels)
    write_image(tmp_path / "b" / "0.jpeg", pixels)
    data = load_image_folder(tmp_path)
    assert data.images.shape == (2, 3, 8, 6)
    assert np.abs(data.images[0].astype(int) - [[[200]], [[40]], [[90]]]).max() <= 3  # lossy


def _as_la(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels).convert("LA")  # its alpha is dropped


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels[..., None], 3, axis=2)


@pytest.mark.parametrize(
    ("suffix", "encode", "stored_mode"),
    [
        (".png", _as_la, "LA"),
        (".webp", lambda pixels: pixels, "RGB"),  # WebP has no grayscale mode
        (".png", _as_rgb, "RGB"),  # R = G = B is gray content in a colour mode
    ],
)
def test_all_gray_gives_one_channel(
    tmp_path: Path, suffix: str, encode: Callable[[np.ndarray], Encoded], stored_mode: str
) -> None:
    first, second = gray(), gray()
    write_image(tmp_path / "a" / "0.png", first)
    path = write_image(tmp_path / "b" / f"0{suffix}", encode(second))
    with Image.open(path) as stored:
        assert stored.mode == stored_mode
    data = load_image_folder(tmp_path)
    assert data.images.shape == (2, 1, 8, 6)
    np.testing.assert_array_equal(data.images[:, 0], [first, second])


def test_mixed_gray_and_colour_become_rgb(tmp_path: Path) -> None:
    """One colour image makes the dataset RGB, gray images repeated: nothing is thrown away."""
    plain, rgb = gray(), colour()
    write_image(tmp_path / "a" / "0.png", plain)
    write_image(tmp_path / "a" / "1.png", gray())
    write_image(tmp_path / "b" / "0.png", rgb)
    data = load_image_folder(tmp_path)
    assert data.images.shape == (3, 3, 8, 6)
    np.testing.assert_array_equal(data.images[0], np.stack([plain] * 3))
    np.testing.assert_array_equal(data.images[2], rgb.transpose(2, 0, 1))


def test_alpha_is_dropped_and_palettes_are_expanded(tmp_path: Path) -> None:
    rgb = colour()
    rgba = np.concatenate([rgb, RNG.integers(0, 256, (8, 6, 1), dtype=np.uint8)], axis=2)
    write_image(tmp_path / "a" / "0.png", rgba)
    palette = Image.fromarray(colour()).quantize(colors=4)  # a P-mode PNG
    write_image(tmp_path / "b" / "0.png", palette)
    data = load_image_folder(tmp_path)
    np.testing.assert_array_equal(data.images[0], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(
        data.images[1], np.asarray(palette.convert("RGB")).transpose(2, 0, 1)
    )


def test_channels_can_be_forced(tmp_path: Path) -> None:
    rgb, plain = colour(), gray()
    write_image(tmp_path / "a" / "0.png", rgb)
    write_image(tmp_path / "b" / "0.png", plain)
    as_gray = load_image_folder(tmp_path, channels=1)
    assert as_gray.images.shape == (2, 1, 8, 6)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))  # ITU-R 601-2, as Pillow computes it
    np.testing.assert_array_equal(as_gray.images[0, 0], luma)
    np.testing.assert_array_equal(as_gray.images[1, 0], plain)
    (tmp_path / "a" / "0.png").unlink()
    write_image(tmp_path / "a" / "0.png", gray())
    assert load_image_folder(tmp_path, channels=3).images.shape == (2, 3, 8, 6)


def test_mismatched_sizes_are_refused_with_both_sizes(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "0.png", colour(8, 6))
    write_image(tmp_path / "a" / "1.png", colour(8, 6))
    write_image(tmp_path / "b" / "0.png", colour(9, 6))
    write_image(tmp_path / "b" / "1.png", colour(5, 5))
    with pytest.raises(DataError) as caught:
        load_image_folder(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "b" / "0.png") in message and "9×6" in message
    assert str(tmp_path / "a" / "0.png") in message and "8×6" in message
    assert "1.png" not in message  # the first offending file only


def test_size_resizes_every_image(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "0.png", colour(8, 6))
    write_image(tmp_path / "b" / "0.png", colour(40, 20))
    flat = np.full((4, 4, 3), 77, dtype=np.uint8)
    write_image(tmp_path / "b" / "1.png", flat)
    data = load_image_folder(tmp_path, size=(5, 7))
    assert data.images.shape == (3, 3, 5, 7)
    assert (data.images[2] == 77).all()  # a constant image stays constant under bilinear
    with pytest.raises(DataError, match="positive"):
        load_image_folder(tmp_path, size=(0, 7))


@pytest.mark.parametrize("name", ["notes.txt", "anim.gif", "scan.tiff", "labels.csv"])
def test_other_files_in_a_class_folder_are_refused(tmp_path: Path, name: str) -> None:
    two_classes(tmp_path)
    (tmp_path / "b" / name).write_bytes(b"x")
    with pytest.raises(DataError, match=rf"{name}: not an image file.*\.png, \.jpg"):
        load_image_folder(tmp_path)


def test_hidden_entries_and_top_level_files_are_ignored(tmp_path: Path) -> None:
    two_classes(tmp_path)
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()  # a hidden folder is no class
    (tmp_path / "README.md").write_text("my data")
    data = load_image_folder(tmp_path)
    assert data.class_names == ("a", "b") and len(data) == 2


def test_nested_folders_are_refused(tmp_path: Path) -> None:
    two_classes(tmp_path)
    write_image(tmp_path / "b" / "deeper" / "1.png", colour())
    with pytest.raises(DataError, match=r"deeper: nested folders are not read"):
        load_image_folder(tmp_path)


def test_an_empty_class_is_refused(tmp_path: Path) -> None:
    two_classes(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".keep").write_bytes(b"")
    with pytest.raises(
        DataError, match=re.escape(f"class folder {tmp_path / 'c'} holds no images")
    ):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("classes", [0, 1])
def test_fewer_than_two_classes_are_refused(tmp_path: Path, classes: int) -> None:
    write_image(tmp_path / "stray.png", colour())  # images at the top level are no class
    for index in range(classes):
        write_image(tmp_path / f"c{index}" / "0.png", colour())
    with pytest.raises(DataError, match=rf"has {classes} class sub-folder\(s\).*at least 2"):
        load_image_folder(tmp_path)


def _truncated_png(path: Path) -> None:
    write_image(path, colour(32, 32))
    path.write_bytes(path.read_bytes()[:-60])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")


def _gif_named_png(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(colour()).save(buffer, "GIF")
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize(
    ("name", "damage"),
    [("bad.png", _truncated_png), ("bad.jpg", _garbage), ("bad.png", _gif_named_png)],
)
def test_a_corrupt_image_is_refused_with_its_path(
    tmp_path: Path, name: str, damage: Callable[[Path], None]
) -> None:
    two_classes(tmp_path)
    path = tmp_path / "b" / name
    damage(path)
    with pytest.raises(DataError, match="is not a readable PNG, JPEG or WebP image") as caught:
        load_image_folder(tmp_path, size=(8, 6))  # `size`: no header pass, the decoder meets it
    assert str(path) in str(caught.value)
    if damage is not _truncated_png:  # a truncated PNG's header is intact: caught when decoding
        with pytest.raises(DataError, match=re.escape(str(path))):
            load_image_folder(tmp_path)


def test_animated_and_16_bit_images_are_refused(tmp_path: Path) -> None:
    two_classes(tmp_path)
    frames = [Image.fromarray(colour()) for _ in range(2)]
    animated = tmp_path / "b" / "anim.webp"
    frames[0].save(animated, save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(DataError, match=r"anim.webp is animated \(2 frames\)"):
        load_image_folder(tmp_path)
    animated.unlink()
    deep = tmp_path / "b" / "deep.png"
    Image.fromarray(RNG.integers(0, 65536, (8, 6), dtype=np.uint16)).save(deep)
    with pytest.raises(DataError, match=r"deep.png has pixel mode I;16"):
        load_image_folder(tmp_path)


def test_a_flat_folder_is_the_test_split_only(tmp_path: Path) -> None:
    two_classes(tmp_path)
    assert len(load_image_folder(tmp_path, "test")) == 2
    with pytest.raises(DataError, match=r"used as the test split.*train/<class>/"):
        load_image_folder(tmp_path, "train")


def test_train_and_test_sub_folders_are_the_splits(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        write_image(tmp_path / "train" / name / "0.png", colour())
        write_image(tmp_path / "train" / name / "1.png", colour())
        write_image(tmp_path / "test" / name / "0.png", colour())
    train, test = load_image_folder(tmp_path, "train"), load_image_folder(tmp_path, "test")
    assert (len(train), len(test)) == (4, 2)
    assert train.class_names == test.class_names == ("cat", "dog")


def test_split_layout_rules(tmp_path: Path) -> None:
    two_classes(tmp_path / "test")
    with pytest.raises(DataError, match=r"has no train/ sub-folder \(only test/\)"):
        load_image_folder(tmp_path, "train")
    write_image(tmp_path / "train" / "a" / "0.png", colour())
    write_image(tmp_path / "train" / "c" / "0.png", colour())
    with pytest.raises(DataError, match=r"same class folders, got \['a', 'c'\] and \['a', 'b'\]"):
        load_image_folder(tmp_path, "test")
    write_image(tmp_path / "extra" / "0.png", colour())
    with pytest.raises(DataError, match=r"mixes split folders \(test, train\).*\(extra\)"):
        load_image_folder(tmp_path, "test")


def test_load_dataset_reads_a_folder_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_classes(tmp_path / "cifar10")
    assert load_dataset(str(tmp_path / "cifar10"), "test").class_names == ("a", "b")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="CIFAR-10 needs --data-dir"):
        load_dataset("cifar10", "test")  # a name wins over a folder of that name
    assert len(load_dataset("./cifar10", "test")) == 2
    with pytest.raises(DataError, match=r"unknown dataset 'no/such/folder'.*image folder"):
        load_dataset("no/such/folder", "test")
    with pytest.raises(DataError, match=r"image folder .*used as the test split"):
        load_dataset("cifar10/", "train")
