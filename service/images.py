"""Image files as inference requests: from a multipart form or base64 strings to one float32 batch.

The v1 route (`routes_v1.py`) finds the files in its body (`read_form`, or the JSON fields) and
hands them over, not yet decoded, as `EncodedImages`; the request reader (`payload.py`) decodes
them for the model that will serve the request (`decode_images`), always in its parse thread: a
1 KiB PNG can claim millions of pixels, so no body is small enough to decode on the event loop.

Every limit is checked before a pixel is decoded: first for the request, how many files
(`max_inputs`) and the bytes of each file and of all of them (`ImageLimits`; base64 is measured
before it is decoded); then for each file, just before it is decoded (one at a time, so that at most
one file is open), its format (by its first bytes: PNG, JPEG or WebP, nothing else), a JPEG's scan
count (`MAX_JPEG_SCANS`: a scan bomb costs seconds of CPU), and from its header its pixels
(`max_image_pixels`: a decompression bomb is refused on what it claims) and its size. A PNG's text
chunks are capped (`PNG_TEXT_BYTES`), since Pillow keeps them with the open file. The files are
opened with Pillow's PNG, JPEG and WebP readers themselves rather than `Image.open`, whose
decompression-bomb check would warn to the log or raise for sizes that only `max_image_pixels`
should decide; a WebP file's size is read from its header here, before Pillow's reader, which
allocates the whole canvas as it opens a file. The pixels are then read by the pixel rules the
image-folder loader uses (`artifact/pixels.py`: `image_pixels`, `to_channels`, `unit_floats`), so an
image sent here and the same file in a calibration folder are the same input to the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import ImageFile, PngImagePlugin
from PIL.JpegImagePlugin import JpegImageFile
from PIL.PngImagePlugin import PngImageFile
from PIL.WebPImagePlugin import WebPImageFile
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from marginwatch.artifact.pixels import PixelError, image_pixels, to_channels, unit_floats
from marginwatch.service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from marginwatch.service.settings import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_REQUEST_BYTES

# A PNG's text chunks (tEXt, zTXt, iTXt), which Pillow keeps in memory with the open file: at
# most this many bytes decompressed per chunk and per file (`_cap_png_text`)
PNG_TEXT_CHUNK_BYTES = 64 * 1024
PNG_TEXT_BYTES = 256 * 1024
# Scans of one JPEG file: encoders write 1 (baseline) to about 10 (progressive, libjpeg's
# default script); each one costs a pass over the whole image (`_check_scans`)
MAX_JPEG_SCANS = 100
ACCEPTED = "PNG, JPEG and WebP"
RESIZE = "resize"  # the option's name in JSON, in a form and in the query string
FORM_FILE = "file"  # the form field of every image file (repeated for several)
FORM_FLAGS = (RESIZE, "return_probabilities")
FORM_NUMBERS = ("eps",)  # the budget (`budgets.py`)
FORM_FLAG_BYTES = 16  # the longest value a flag field may have ("false" and some whitespace)

# Pillow's reader class of each accepted format (`artifact.pixels.IMAGE_FORMATS`)
_READERS: dict[str, Callable[[io.BytesIO], ImageFile.ImageFile]] = {
    "PNG": PngImageFile,
    "JPEG": JpegImageFile,
    "WEBP": WebPImageFile,
}
# Formats clients send by mistake, by signature: named in the 415, so the client knows what it sent
_REFUSED_SIGNATURES = (
    (b"GIF8", "a GIF"),
    (b"BM", "a BMP"),
    (b"II*\x00", "a TIFF"),
    (b"MM\x00*", "a TIFF"),
    (b"%PDF", "a PDF"),
)
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
# python-multipart logs a warning for each malformed body before it raises; the error becomes the
# client's 400, and the warning would be log noise that any client can cause. A logger outside
# the logging tree, so that nothing global changes.
_UNLOGGED = logging.Logger("python_multipart.unlogged", logging.CRITICAL)


@dataclass(frozen=True)
class ImageLimits:
    """What one image request may carry (settings `max_image_bytes`, `max_image_request_bytes`,
    `max_image_pixels`), beside `max_inputs_per_request` files."""

    max_image_bytes: int = MAX_IMAGE_BYTES  # one file, as decoded from base64
    max_request_bytes: int = MAX_IMAGE_REQUEST_BYTES  # every file of the request together
    max_image_pixels: int = MAX_IMAGE_PIXELS  # width × height, from the file's header


@dataclass(frozen=True)
class EncodedImages:
    """Image files as a request carried them, named as error messages name them (`images[2]`,
    `file 0 ('shirt.png')`), with its `resize` option if the body stated one."""

    files: list[tuple[str, bytes]]
    base64: bool  # whether each file is still base64 text (JSON), or raw bytes (a form)
    resize: bool | None = None


def parse_number(value: str, what: str) -> float:
    """A positive finite decimal number from a form field."""
    try:
        number = float(value.strip())
    except ValueError:
        raise InvalidInput(f"{what} must be a number, not {value!r:.40}") from None
    if not (math.isfinite(number) and number > 0):
        raise InvalidInput(f"{what} must be a positive finite number, not {value!r:.40}")
    return number


def parse_flag(value: str, what: str) -> bool:
    """`true`/`false` (or 1/0, any case) from a form field or a query parameter."""
    text = value.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise InvalidInput(f"{what} must be true or false, got {value[:20]!r}")


def resize_option(stated: bool | None, query: str | None) -> bool:
    """Whether to resize: the body's `resize`, or `?resize=`; both, only if they agree."""
    if query is None:
        return bool(stated)
    asked = parse_flag(query, f"the query parameter {RESIZE}")
    if stated is not None and stated != asked:
        raise InvalidInput(
            f"{RESIZE} is {str(stated).lower()} in the body but {str(asked).lower()} in the query"
        )
    return asked


# --- multipart forms --------------------------------------------------------------------------


@dataclass
class _Part:
    headers: dict[bytes, bytes]
    data: list[bytes]


def _form_parts(body: bytes, content_type: str) -> list[_Part]:
    """The parts of a multipart body, each with its headers (lower-case names) and data."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise InvalidInput("a multipart/form-data Content-Type needs its boundary parameter")
    parts: list[_Part] = []
    header: list[bytes] = [b"", b""]
    ended: list[bool] = []

    def on_header_end() -> None:
        parts[-1].headers[header[0].strip().lower()] = header[1].strip()
        header[:] = [b"", b""]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data.append(data[start:end])

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": lambda: parts.append(_Part({}, [])),
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_part_data": on_part_data,
                "on_end": lambda: ended.append(True),
            },
        )
        parser.logger = _UNLOGGED
        parser.write(body)
    except (FormParserError, ValueError) as error:
        raise InvalidInput(f"the multipart body is malformed: {error}") from None
    if not ended:
        raise InvalidInput("the multipart body ends before its closing boundary")
    return parts


def read_form(
    body: bytes, content_type: str
) -> tuple[list[tuple[str, bytes]], dict[str, bool], dict[str, float]]:
    """The image files of a multipart form (its `file` parts, in order), its flags
    (`FORM_FLAGS` given) and its numbers (`FORM_NUMBERS` given). Any other field, a field given
    twice, a flag not true/false or a number that is not one is refused."""
    files: list[tuple[str, bytes]] = []
    flags: dict[str, bool] = {}
    numbers: dict[str, float] = {}
    for part in _form_parts(body, content_type):
        options = parse_options_header(part.headers.get(b"content-disposition"))[1]
        name = options.get(b"name", b"").decode("latin-1")
        if name == FORM_FILE:
            filename = options.get(b"filename")
            label = f"file {len(files)}" + (
                f" ({filename.decode('latin-1')!r})" if filename else ""
            )
            files.append((label, b"".join(part.data)))
        elif name in FORM_FLAGS:
            value = b"".join(part.data)
            if name in flags or len(value) > FORM_FLAG_BYTES:
                raise InvalidInput(f"the form field {name} must be given once, as true or false")
            flags[name] = parse_flag(value.decode("latin-1"), f"the form field {name}")
        elif name in FORM_NUMBERS:
            value = b"".join(part.data)
            if name in numbers or len(value) > FORM_FLAG_BYTES:
                raise InvalidInput(f"the form field {name} must be given once, as a number")
            numbers[name] = parse_number(value.decode("latin-1"), f"the form field {name}")
        else:
            raise InvalidInput(
                f"unknown form field {name!r}: the form takes {FORM_FILE} (one part per image "
                f"file), the flags {' and '.join(FORM_FLAGS)} and the budget "
                f"{' and '.join(FORM_NUMBERS)}"
            )
    if not files:
        raise InvalidInput(
            f"the form has no {FORM_FILE} part: send each image as one (curl -F {FORM_FILE}=@x.png)"
        )
    return files, flags, numbers


# --- decoding ---------------------------------------------------------------------------------


def _file_bytes(data: bytes, is_base64: bool) -> int:
    """A file's size; for base64 text, the size it decodes to (if it is valid), computed without
    decoding it."""
    if not is_base64:
        return len(data)
    return len(data) * 3 // 4 - data[-2:].count(b"=")


def _check_sizes(encoded: EncodedImages, limits: ImageLimits, max_inputs: int) -> None:
    files = encoded.files
    if not files:
        raise InvalidInput("the request holds no image: send at least one")
    if len(files) > max_inputs:
        raise InvalidInput(
            f"the request holds {len(files)} images; the limit is {max_inputs} per request"
        )
    total = 0
    for name, data in files:
        size = _file_bytes(data, encoded.base64)
        if size > limits.max_image_bytes:
            raise PayloadTooLarge(
                f"{name} has {size} bytes; the limit is {limits.max_image_bytes} bytes per image "
                "(max_image_bytes)"
            )
        total += size
    if total > limits.max_request_bytes:
        raise PayloadTooLarge(
            f"the request's {len(files)} images have {total} bytes together; the limit is "
            f"{limits.max_request_bytes} bytes per request (max_image_request_bytes)"
        )


def _raw(name: str, data: bytes, is_base64: bool) -> bytes:
    if not is_base64:
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        hint = " (send the base64 text alone, without its data: URL prefix)"
        raise InvalidInput(
            f"{name} is not valid base64: {error}{hint if data.startswith(b'data:') else ''}"
        ) from None


def _format_of(raw: bytes) -> str | None:
    """The accepted format whose signature `raw` starts with, else None."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return None


def _open(name: str, raw: bytes, max_pixels: int) -> tuple[ImageFile.ImageFile, str]:
    """The file opened by its format's reader, its header read and nothing decoded, and its
    format; refused (415, 400, 413) if its format, its header or its pixel count is wrong."""
    if not raw:
        raise InvalidInput(f"{name} is empty")
    kind = _format_of(raw)
    if kind is None:
        what = next((what for sign, what in _REFUSED_SIGNATURES if raw.startswith(sign)), None)
        sent = f"is {what} file" if what else "is not an image file this service reads"
        raise UnsupportedMediaType(
            f"{name} {sent}: only {ACCEPTED} files are accepted, no other formats"
        )
    if kind == "JPEG":
        _check_scans(name, raw)
    if kind == "WEBP":  # its reader allocates the whole canvas as it opens the file
        size = _webp_size(raw)
        if size is None:
            raise InvalidInput(f"{name} is not a readable WEBP image: no size in its header")
        _check_pixels(name, size, max_pixels)
    try:
        image = _READERS[kind](io.BytesIO(raw))
    except Exception as error:  # Pillow's readers raise many types for one damaged header
        raise InvalidInput(f"{name} is not a readable {kind} image: {error}") from None
    try:
        _check_pixels(name, (image.height, image.width), max_pixels)
    except PayloadTooLarge:
        image.close()
        raise
    return image, kind


def _check_scans(name: str, raw: bytes) -> None:
    """Refuse a JPEG of more than `MAX_JPEG_SCANS` scans, counted by their SOS markers before
    a byte is decoded (one C-level search, about 50 µs for 512 KB). libjpeg decodes every scan
    over the whole image: a 512 KB progressive 2048×2048 file of about 31,000 scans took 10 s
    of CPU, with the parse thread held all along. In entropy-coded data an 0xFF byte is always
    followed by 0x00 or a restart marker, so the count is exact but for markers inside
    metadata (an embedded EXIF thumbnail adds its own one)."""
    scans = raw.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise InvalidInput(
            f"{name} is a JPEG of {scans} scans; the limit is {MAX_JPEG_SCANS} (a progressive "
            "JPEG has about 10): send it as a baseline or ordinary progressive JPEG"
        )


def _check_pixels(name: str, size: tuple[int, int], max_pixels: int) -> None:
    height, width = size
    if height * width > max_pixels:
        raise PayloadTooLarge(
            f"{name} is {height}×{width} (height×width), {height * width} pixels; the limit is "
            f"{max_pixels} pixels per image (max_image_pixels)"
        )


def _webp_size(raw: bytes) -> tuple[int, int] | None:
    """Height and width from a WebP file's first chunk, where Pillow's reader finds them."""
    chunk = raw[12:16]
    if chunk == b"VP8 " and len(raw) >= 30 and raw[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", raw, 26)
        return height & 0x3FFF, width & 0x3FFF
    if chunk == b"VP8X" and len(raw) >= 30:
        width, height = (int.from_bytes(raw[at : at + 3], "little") + 1 for at in (24, 27))
        return height, width
    if chunk == b"VP8L" and len(raw) >= 25 and raw[20] == 0x2F:
        bits = int.from_bytes(raw[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    return None


def _target_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InvalidInput(
            f"the model takes inputs of shape {list(input_shape)}, which images cannot give: "
            "images need a C×H×W input with 1 or 3 channels; send floats"
        )
    channels, height, width = input_shape
    return channels, height, width


def decode_images(
    encoded: EncodedImages,
    *,
    input_shape: Sequence[int],
    input_range: tuple[float, float],
    resize: bool,
    limits: ImageLimits,
    max_inputs: int,
) -> np.ndarray:
    """The files as one float32 batch N×C×H×W for a model that takes `input_shape` in
    `input_range`: 8-bit grayscale or RGB, alpha dropped, gray repeated into RGB or colour to
    luma as the model's channels need (`artifact.pixels.to_channels`), resized to H×W (bilinear) if
    `resize`, else refused unless of that size; pixel values / 255, then mapped linearly onto
    `input_range` (the identity for [0, 1]). The request's limits (count, bytes) are checked
    before the first file is opened; each file's header (format, pixels, size) before it is
    decoded, one file at a time."""
    channels, height, width = _target_shape(input_shape)
    _check_sizes(encoded, limits, max_inputs)
    _cap_png_text()
    batch = np.empty((len(encoded.files), channels, height, width), dtype=np.uint8)
    for index, (name, data) in enumerate(encoded.files):
        # one file at a time, opened, decoded and closed before the next is opened: an open
        # file holds what its reader has read so far (a PNG's text chunks, a JPEG's tables)
        image, kind = _open(name, _raw(name, data, encoded.base64), limits.max_image_pixels)
        with image:
            if not resize and (image.height, image.width) != (height, width):
                raise InvalidInput(
                    f"{name} is {image.height}×{image.width} (height×width) but the model takes "
                    f"{height}×{width}: send images of that size, or set {RESIZE}=true to "
                    "resize them (bilinear, aspect ratio not kept)"
                )
            batch[index] = to_channels(_pixels(name, image, kind, (height, width)), channels)
    return _in_range(unit_floats(batch), input_range)


def _cap_png_text() -> None:
    """Pillow's limits on a PNG's text chunks, lowered from 1 MB a chunk and 64 MB a file (which
    11 files of 63 compressed 1 MB chunks turned into 818 MB) to `PNG_TEXT_CHUNK_BYTES` and
    `PNG_TEXT_BYTES`: the model never reads the text, and a file with more is refused (400).
    Pillow reads them as module attributes when it meets a text chunk; set here, where the
    service decodes images, rather than at import."""
    PngImagePlugin.MAX_TEXT_CHUNK = PNG_TEXT_CHUNK_BYTES
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES


def _pixels(name: str, image: ImageFile.ImageFile, kind: str, size: tuple[int, int]) -> np.ndarray:
    try:
        return image_pixels(image, size)
    except PixelError as error:  # animated, or 16-bit: the pixel rules' own refusals
        raise InvalidInput(f"{name} {error}") from None
    except Exception as error:  # truncated or damaged data: Pillow's decoders raise many types
        raise InvalidInput(f"{name} is a damaged {kind} image: {error}") from None


def _in_range(unit: np.ndarray, input_range: tuple[float, float]) -> np.ndarray:
    low, high = input_range
    if (low, high) == (0.0, 1.0):  # every model calibrated here: the loader's values exactly
        return unit
    # clipped: low + (high − low) × 1 may round past high, which the batch check would refuse
    return np.clip(low + (high - low) * unit, low, high).astype(np.float32)
