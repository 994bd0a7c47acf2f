"""Image files as v1 requests, against a real server: PNG and JPEG files made from the shipped
Fashion-MNIST subset, sent as a multipart form, as base64 `images` and as KServe v1 `b64`
instances, get exactly the response of the float request of the same decoded pixels; every
refusal (size, format, damage, decompression bomb, limits, base64) is the 4xx it should be."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

from marginwatch.artifact.schema import RECORD_FILE, CalibrationRecord
from marginwatch.models.data import Dataset

if TYPE_CHECKING:
    from conftest import Server, ServerFactory, VersionFactory

MODEL = "fmnist"
V1 = f"/v1/models/{MODEL}/predict"
ENCODINGS = ("form", "json-images", "kserve-b64")


# --- files and requests -----------------------------------------------------------------------


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    """uint8 H×W (gray) or H×W×C pixels, or a Pillow image, as a file of `fmt`."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    options = {"JPEG": {"quality": 90}, "WEBP": {"lossless": True}}.get(fmt, {})
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """What Pillow (the same libjpeg as the server's) decodes a file to."""
    return np.asarray(Image.open(io.BytesIO(data)))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_webp(height: int, width: int) -> bytes:
    """A 30-byte WebP (extended format) whose header claims height × width pixels."""
    header = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
    size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 22) + b"WEBP" + header + size


def bomb_png(height: int, width: int) -> bytes:
    """A 100-byte PNG whose header claims height × width 8-bit gray pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def send(
    client: httpx.Client,
    files: list[bytes],
    encoding: str = "form",
    *,
    path: str = V1,
    **options: object,
) -> httpx.Response:
    """The files as one v1 request in `encoding` (`ENCODINGS`), with options (`resize`)."""
    if encoding == "form":
        parts = [("file", (f"{index}.img", data)) for index, data in enumerate(files)]
        flags = {key: str(value).lower() for key, value in options.items()}
        return client.post(path, files=parts, data=flags)
    texts = [base64.b64encode(data).decode() for data in files]
    if encoding == "json-images":
        return client.post(path, json={"images": texts, **options})
    return client.post(path, json={"instances": [{"b64": text} for text in texts], **options})


def floats_response(client: httpx.Client, pixels: np.ndarray, path: str = V1) -> dict[str, Any]:
    """The response to the float request of uint8 N×C×H×W pixels (value / 255)."""
    x = pixels.astype(np.float32) / 255.0
    response = client.post(
        path,
        content=orjson.dumps({"inputs": x.tolist()}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_same_response(response: httpx.Response, expected: dict[str, Any]) -> None:
    """Labels, scores, flags and all: the model saw the same floats."""
    assert response.status_code == 200, response.text
    assert response.json() == expected


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message


@pytest.fixture(scope="module")
def gray(fashion_subset: Dataset) -> np.ndarray:
    """Eight test images, uint8 N×28×28, from every class but two."""
    return fashion_subset.images[:8, 0]


# --- the response is the float request's --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])  # lossless: the pixels themselves
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_lossless_files_get_the_response_of_their_pixels_as_floats(
    client: httpx.Client, gray: np.ndarray, encoding: str, fmt: str
) -> None:
    expected = floats_response(client, gray[:, None])
    assert any(item["brittle"] for item in expected["predictions"])  # both flags are compared
    assert not all(item["brittle"] for item in expected["predictions"])
    files = [encode(image, fmt) for image in gray]
    assert_same_response(send(client, files, encoding), expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_jpeg_files_get_the_response_of_their_decoded_pixels(
    client: httpx.Client, gray: np.ndarray, encoding: str
) -> None:
    files = [encode(image, "JPEG") for image in gray]
    pixels = np.stack([decoded(data) for data in files])
    assert not np.array_equal(pixels, gray)  # lossy: the comparison is with what was decoded
    assert_same_response(send(client, files, encoding), floats_response(client, pixels[:, None]))


def test_probabilities_on_request_in_a_form(client: httpx.Client, gray: np.ndarray) -> None:
    response = send(client, [encode(gray[0])], return_probabilities=True)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["probabilities"]) == 10


def test_colour_and_alpha_become_the_models_one_channel(
    client: httpx.Client, gray: np.ndarray
) -> None:
    """Gray saved as RGB is the gray image; colour is Pillow's luma; alpha is dropped."""
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    files = [
        encode(np.repeat(gray[0][..., None], 3, axis=2)),  # RGB with R = G = B
        encode(colour),
        encode(np.concatenate([colour, alpha], axis=2)),  # RGBA
        encode(Image.fromarray(gray[1]).convert("LA")),
    ]
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    pixels = np.stack([gray[0], luma, luma, gray[1]])[:, None]
    assert_same_response(send(client, files), floats_response(client, pixels))


# --- size and resize ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["form", "json", "query"])
def test_resize_true_resizes_bilinearly_and_without_it_another_size_is_refused(
    client: httpx.Client, gray: np.ndarray, where: str
) -> None:
    large = Image.fromarray(gray[2]).resize((56, 56), Image.Resampling.NEAREST)
    data = encode(large)
    expected_pixels = np.asarray(large.resize((28, 28), Image.Resampling.BILINEAR))
    expected = floats_response(client, expected_pixels[None, None])
    encoding = "form" if where == "form" else "json-images"
    if where == "query":
        response = send(client, [data], encoding, path=f"{V1}?resize=true")
    else:
        response = send(client, [data], encoding, resize=True)
    assert_same_response(response, expected)
    assert_refused(send(client, [data], encoding), 400, "56×56", "takes 28×28", "resize=true")


def test_resize_stated_twice_must_agree(client: httpx.Client, gray: np.ndarray) -> None:
    data = encode(gray[0])
    response = send(client, [data], "json-images", path=f"{V1}?resize=true", resize=False)
    assert_refused(response, 400, "resize is false in the body but true in the query")


def test_resize_applies_to_images_only(client: httpx.Client, gray: np.ndarray) -> None:
    x = (gray[:1, None] / 255.0).tolist()
    assert_refused(client.post(V1, json={"inputs": x, "resize": True}), 400, "applies to images")


# --- refusals ----------------------------------------------------------------------------------


def test_a_truncated_png_is_refused_naming_the_file(client: httpx.Client, gray: np.ndarray) -> None:
    whole = encode(gray[0])
    response = send(client, [whole, whole[: len(whole) // 2]])
    assert_refused(response, 400, "file 1 ('1.img')", "damaged PNG", "truncated")


def test_a_decompression_bomb_is_refused_from_its_header(client: httpx.Client) -> None:
    """100000 × 100000 pixels claimed by 100 bytes: refused on the claim, never decoded (10 GB)."""
    bomb = bomb_png(100_000, 100_000)
    assert len(bomb) < 200
    for encoding in ENCODINGS:
        assert_refused(
            send(client, [bomb], encoding), 413, "100000×100000", "max_image_pixels", "4194304"
        )
    # WebP, whose reader would allocate the canvas on opening: beyond Pillow's own limit (2 ×
    # 89.5 M pixels, where Pillow raises), and under it (where it would allocate 400 MB)
    for height, width in [(16384, 16384), (10_000, 10_000)]:
        response = send(client, [bomb_webp(height, width)])
        assert_refused(response, 413, f"{height}×{width}", "max_image_pixels")
    # a claim under the limit, but of the wrong size, is a plain 400
    assert_refused(send(client, [bomb_png(2000, 2000)]), 400, "2000×2000")


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (encode(np.zeros((28, 28), np.uint8), "GIF"), "is a GIF file"),
        (encode(np.zeros((28, 28), np.uint8), "BMP"), "is a BMP file"),
        (b"%PDF-1.4\n", "is a PDF file"),
        (b"label,pixels\n3,0 0 0\n", "is not an image file"),
    ],
    ids=["gif", "bmp", "pdf", "text"],
)
def test_other_formats_are_unsupported_media(client: httpx.Client, data: bytes, named: str) -> None:
    for encoding in ENCODINGS:
        assert_refused(send(client, [data], encoding), 415, named, "only PNG, JPEG and WebP")


def test_a_wrong_content_type_is_unsupported_media(client: httpx.Client, gray: np.ndarray) -> None:
    response = client.post(V1, content=encode(gray[0]), headers={"Content-Type": "image/png"})
    assert_refused(response, 415, "'image/png'", "application/json or multipart/form-data")


def test_more_files_than_inputs_per_request_are_refused(
    client: httpx.Client, gray: np.ndarray
) -> None:
    files = [encode(gray[0])] * 65
    for encoding in ENCODINGS:
        assert_refused(send(client, files, encoding), 400, "65 images; the limit is 64")


def test_file_sizes_are_checked_before_decoding(client: httpx.Client) -> None:
    """One file over `max_image_bytes` (512 KiB), or files over `max_image_request_bytes`
    (768 KiB) together: 413, whatever their bytes (these are not even images)."""
    rng = np.random.default_rng(1)
    png = b"\x89PNG\r\n\x1a\n"
    big = png + rng.bytes(600_000)
    assert_refused(send(client, [big]), 413, "file 0 ('0.img') has 600008 bytes", "max_image_bytes")
    half = png + rng.bytes(400_000)
    assert_refused(send(client, [half, half]), 413, "800016 bytes together", "786432")
    # as base64: measured before it is decoded
    assert_refused(send(client, [big], "json-images"), 413, "images[0] has 600008 bytes")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"images": ["not base64!"]}, "images[0] is not valid base64"),
        ({"images": ["data:image/png;base64,iVBORw0KGgo="]}, "without its data: URL prefix"),
        ({"instances": [{"b64": "%%%"}]}, "instances[0].b64 is not valid base64"),
        ({"instances": [{"b64": 3}]}, "instances[0].b64 must be a string"),
        ({"instances": [{"b64": "AAAA"}, [[[0.5]]]]}, "instances[1] must be {'b64'"),
        ({"instances": [{"image": "AAAA"}]}, "instances[0] must be {'b64'"),
        ({"images": ["éé"]}, "images[0] is not valid base64"),
        ({"images": [""]}, "images[0] is empty"),
        ({"images": []}, "holds no image"),
        ({"images": ["AAAA"], "inputs": [[[[0.5]]]]}, "inputs and images together"),
    ],
    ids=["not-base64", "data-url", "kserve-not-base64", "kserve-number", "kserve-mixed",
         "kserve-other-key", "not-ascii", "empty-file", "no-images", "two-batches"],
)  # fmt: skip
def test_bad_json_image_bodies_are_refused_with_a_reason(
    client: httpx.Client, body: dict[str, Any], words: str
) -> None:
    assert_refused(client.post(V1, json=body), 400, words)


def test_bad_forms_are_refused_with_a_reason(client: httpx.Client, gray: np.ndarray) -> None:
    png = encode(gray[0])
    assert_refused(send(client, [png], resize="maybe"), 400, "resize must be true or false")
    response = client.post(V1, files=[("file", ("a.png", png))], data={"colour": "1"})
    assert_refused(response, 400, "unknown form field 'colour'")
    response = client.post(V1, files=[("other", ("a.png", png))])
    assert_refused(response, 400, "unknown form field 'other'")
    response = client.post(V1, files=[("resize", (None, "true"))])
    assert_refused(response, 400, "the form has no file part")
    cut = b'--xx\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + png
    response = client.post(
        V1, content=cut, headers={"Content-Type": "multipart/form-data; boundary=xx"}
    )
    assert_refused(response, 400, "ends before its closing boundary")
    response = client.post(V1, content=cut, headers={"Content-Type": "multipart/form-data"})
    assert_refused(response, 400, "needs its boundary parameter")


# --- a 3-channel model, and the settings ---------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_server(
    tmp_path_factory: pytest.TempPathFactory,
    new_version: VersionFactory,
    spawn_server: ServerFactory,
) -> Iterator[Server]:
    """A random-weight 3×32×32 model, and a server whose image limits are set small."""
    import torch
    from torch import nn

    from marginwatch.calibration.scores import ServingGraph
    from marginwatch.models.architectures import LogitsAsFeatures
    from marginwatch.models.export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
    onnx = tmp_path_factory.mktemp("rgb") / "model.onnx"
    export_onnx(ServingGraph(LogitsAsFeatures(model, (3, 32, 32), 10)).eval(), (3, 32, 32),
                onnx, ["logits", "score"])  # fmt: skip
    store = tmp_path_factory.mktemp("rgb-store")
    folder = new_version(store, "rgb", "v1", onnx=onnx, threshold=0.0)
    record = CalibrationRecord.model_validate_json((folder / RECORD_FILE).read_bytes())
    shaped = record.model_copy(update={"input_shape": [3, 32, 32]})
    (folder / RECORD_FILE).write_text(shaped.model_dump_json(indent=2))
    with spawn_server(
        store,
        tmp_path_factory.mktemp("rgb-logs"),
        models="rgb",
        reload_interval_s="0",
        max_image_pixels="4096",
        max_image_bytes="20000",
    ) as server:
        yield server


def test_a_three_channel_model_gets_gray_repeated_and_colour_as_is(
    rgb_server: Server, fashion_subset: Dataset
) -> None:
    rng = np.random.default_rng(2)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    gray = np.asarray(Image.fromarray(fashion_subset.images[0, 0]).resize((32, 32)))
    pixels = np.stack([np.repeat(gray[None], 3, axis=0), colour.transpose(2, 0, 1)])
    with httpx.Client(base_url=rgb_server.url, timeout=20) as client:
        path = "/v1/models/rgb/predict"
        expected = floats_response(client, pixels, path)
        assert_same_response(send(client, [encode(gray), encode(colour)], path=path), expected)
        # the server's own settings: 4096 pixels and 20000 bytes per image
        assert_refused(send(client, [bomb_png(65, 64)], path=path), 413, "the limit is 4096")
        big = b"\x89PNG\r\n\x1a\n" + rng.bytes(20_000)
        assert_refused(send(client, [big], path=path), 413, "the limit is 20000 bytes")


def test_the_example_png_of_the_readme_is_a_shirt(client: httpx.Client) -> None:
    """The file the README's quick start sends: a 28×28 gray PNG from the shipped subset."""
    example = Path(__file__).resolve().parents[2] / "examples" / "shirt.png"
    with Image.open(example) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (28, 28))
    response = client.post(V1, files=[("file", ("shirt.png", example.read_bytes()))])
    assert response.status_code == 200, response.text
