"""The Open Inference Protocol over gRPC, end to end: a real server with `grpc_port` and
`tritonclient.grpc`, checked against the same server's HTTP v2 answers.

This process never imports `marginwatch.service.oip_grpc`: its messages and tritonclient's share
their protobuf names, and one process cannot register both in protobuf's default pool. Calls
that tritonclient cannot make (typed `contents`) go through tritonclient's own stubs (Triton's
proto); the shipped `.proto` is compiled here into a descriptor set and loaded into a private
pool, to check it against Triton's messages and the shipped stubs.
"""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from marginwatch.artifact.schema import CalibrationRecord
from marginwatch.service.app import GRPC_STATUS_OF, STATUS_OF
from marginwatch.service.errors import ServiceError
from metrics_text import scrape, total, value

if TYPE_CHECKING:
    from conftest import Server, ServerFactory

API_KEY = "test-key-0123456789"  # conftest's
MODEL = "fmnist"
PROJECT = Path(__file__).resolve().parents[2]
STUBS = PROJECT / "service" / "oip_grpc"
PROTO = "marginwatch/service/oip_grpc/open_inference_grpc.proto"  # as the Makefile names it
KEY = {"x-api-key": API_KEY}
OUTPUTS = ["logits", "label", "score", "brittle", "borderline", "p_robust", "margin_estimate",
           "margin_low", "margin_high", "runner_up"]  # fmt: skip


@pytest.fixture(scope="module")
def grpc_server(
    store: Path, tmp_path_factory: pytest.TempPathFactory, spawn_server: ServerFactory
) -> Iterator[tuple[Server, str]]:
    """The main server's settings (fmnist ready, pending never ready, API keys on) plus gRPC."""
    port = free_port()
    with spawn_server(
        store,
        tmp_path_factory.mktemp("grpc-logs"),
        models=f"{MODEL},pending",
        api_keys=API_KEY,
        reload_interval_s="0",
        grpc_port=str(port),
    ) as server:
        yield server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def http(grpc_server: tuple[Server, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=grpc_server[0].url, headers=KEY, timeout=20) as client:
        yield client


@pytest.fixture(scope="module")
def triton_client(grpc_server: tuple[Server, str]) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(grpc_server[1])
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(grpc_server: tuple[Server, str]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_server[1]) as opened:
        yield opened


@pytest.fixture(scope="module")
def shipped_proto(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """The shipped .proto compiled as `make grpc-stubs` does, as a descriptor."""
    out = tmp_path_factory.mktemp("proto") / "oip.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--descriptor_set_out={out}",
         PROTO],
        cwd=PROJECT, check=True, capture_output=True,
    )  # fmt: skip
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return file


def infer_inputs(batch: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch.astype(np.float32))  # gRPC: always raw_input_contents
    return [tensor]


def http_outputs(http: httpx.Client, batch: np.ndarray) -> dict[str, np.ndarray]:
    body = {
        "inputs": [
            {"name": "input", "shape": list(batch.shape), "datatype": "FP32",
             "data": batch.ravel().tolist()}
        ]
    }  # fmt: skip
    response = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    return {
        output["name"]: np.array(output["data"]).reshape(output["shape"])
        for output in response.json()["outputs"]
    }


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Labels, flags and runner-ups equal, scores, logits and answers equal to float32
    precision."""
    assert list(got) == list(expected)
    for name in ("label", "brittle", "borderline", "runner_up"):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    for name in ("logits", "score"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    # NaN where the version has no answers: JSON's null, float NaN over gRPC
    for name in ("p_robust", "margin_estimate", "margin_low", "margin_high"):
        wanted = np.asarray(expected[name], dtype=np.float64)
        np.testing.assert_allclose(got[name], wanted, rtol=1e-6, equal_nan=True, err_msg=name)


def grpc_error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- health, metadata ------------------------------------------------------------------------


def test_health_and_readiness_agree_with_http(
    triton_client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    assert triton_client.is_server_live()  # health needs no key: protect_health is off
    # `pending` is configured but never published: the server is not ready, over both
    assert http.get("/v2/health/ready").status_code == 503
    assert triton_client.is_server_ready() is False
    assert triton_client.is_model_ready(MODEL, headers=KEY) is True
    assert triton_client.is_model_ready(MODEL, "v1", headers=KEY) is True
    assert triton_client.is_model_ready("pending", headers=KEY) is False
    error = grpc_error(lambda: triton_client.is_model_ready("nope", headers=KEY))
    assert error.status() == "StatusCode.NOT_FOUND"
    error = grpc_error(lambda: triton_client.is_model_ready(MODEL, "v0", headers=KEY))
    assert error.status() == "StatusCode.NOT_FOUND" and "serves version v1" in error.message()


def test_metadata_matches_http(
    triton_client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    server = triton_client.get_server_metadata(headers=KEY)
    assert (server.name, server.version) == (http.get("/v2").json()["name"], "0.1.0")
    meta = triton_client.get_model_metadata(MODEL, headers=KEY)
    expected = http.get(f"/v2/models/{MODEL}").json()
    assert (meta.name, list(meta.versions), meta.platform) == (
        expected["name"], expected["versions"], expected["platform"],
    )  # fmt: skip
    for ours, theirs in ((meta.inputs, expected["inputs"]), (meta.outputs, expected["outputs"])):
        tensors = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ours]
        assert tensors == theirs


def test_metadata_properties_carry_the_calibration(
    channel: grpc.Channel,
    shipped_proto: descriptor_pb2.FileDescriptorProto,
    record: CalibrationRecord,
) -> None:
    """Field 6, `properties`, is the protocol's and not Triton's: read with the shipped proto."""
    pool = descriptor_pool.DescriptorPool()  # private: the default pool holds tritonclient's
    pool.Add(shipped_proto)
    request_type, response_type = (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
        for name in ("ModelMetadataRequest", "ModelMetadataResponse")
    )
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelMetadata",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    meta = call(request_type(name=MODEL), metadata=tuple(KEY.items()))
    assert float(meta.properties["threshold"]) == record.threshold
    assert meta.properties["calibration_version"] == "v1"
    assert meta.properties["providers"] == "CPUExecutionProvider"


# --- infer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 5, 32])
def test_infer_raw_matches_http(
    triton_client: triton.InferenceServerClient,
    http: httpx.Client,
    images: np.ndarray,
    record: CalibrationRecord,
    size: int,
) -> None:
    batch = images[:size]
    result = triton_client.infer(MODEL, infer_inputs(batch), request_id="r-7", headers=KEY)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "v1", "r-7")
    assert [output.name for output in response.outputs] == OUTPUTS
    assert len(response.raw_output_contents) == len(OUTPUTS)  # answered as it was asked: raw
    assert response.parameters["threshold"].double_param == record.threshold
    got = {name: result.as_numpy(name) for name in OUTPUTS}
    assert got["brittle"].dtype == bool and got["label"].dtype == np.int64
    assert_same(got, http_outputs(http, batch))


def test_infer_with_chosen_outputs(
    triton_client: triton.InferenceServerClient, images: np.ndarray
) -> None:
    outputs = [triton.InferRequestedOutput("brittle"), triton.InferRequestedOutput("label")]
    result = triton_client.infer(MODEL, infer_inputs(images[:3]), outputs=outputs, headers=KEY)
    assert [output.name for output in result.get_response().outputs] == ["brittle", "label"]
    assert result.as_numpy("label").shape == (3,)


def test_infer_typed_contents_matches_http(
    channel: grpc.Channel, http: httpx.Client, images: np.ndarray
) -> None:
    """`contents.fp32_contents` in, typed contents out (tritonclient always sends raw bytes)."""
    batch = images[:4]
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=batch.shape)
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {API_KEY}"),))
    assert not response.raw_output_contents
    fields = {"FP32": "fp32_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}
    got = {
        output.name: np.array(getattr(output.contents, fields[output.datatype])).reshape(
            output.shape
        )
        for output in response.outputs
    }
    assert_same(got, http_outputs(http, batch))


# --- errors ----------------------------------------------------------------------------------


def test_errors_have_the_tables_codes_and_name_the_problem(
    triton_client: triton.InferenceServerClient, images: np.ndarray
) -> None:
    def infer(batch: np.ndarray, model: str = MODEL, **options: Any) -> InferenceServerException:
        return grpc_error(lambda: triton_client.infer(model, infer_inputs(batch), **options))

    unknown = infer(images[:1], "nope", headers=KEY)
    assert unknown.status() == "StatusCode.NOT_FOUND" and "no model named 'nope'" in str(unknown)
    assert infer(images[:1], "pending", headers=KEY).status() == "StatusCode.UNAVAILABLE"
    shape = infer(images[:2, :, :, :27], headers=KEY)
    assert shape.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must have shape [N, 1, 28, 28]; got [2, 1, 28, 27]" in shape.message()
    poisoned = images[:2].copy()
    poisoned[1, 0, 3, 3] = np.nan
    nan = infer(poisoned, headers=KEY)
    assert nan.status() == "StatusCode.INVALID_ARGUMENT" and "NaN" in nan.message()
    too_many = infer(np.zeros((65, 1, 28, 28), np.float32), headers=KEY)
    assert "the limit is 64 per request" in too_many.message()
    too_large = infer(np.zeros((100, 1, 28, 28), np.float32), headers=KEY)  # > 64 images' bytes
    assert too_large.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "above the limit of 266240 bytes for model 'fmnist'" in too_large.message()
    outside = infer(images[:1] + 2, headers=KEY)
    assert "outside the model's input range" in outside.message()
    missing = infer(images[:1])
    assert missing.status() == "StatusCode.UNAUTHENTICATED" and "missing API key" in str(missing)
    wrong = infer(images[:1], headers={"authorization": "Bearer not-the-key-at-all"})
    assert wrong.status() == "StatusCode.UNAUTHENTICATED"
    assert "not accepted" in wrong.message()
    unkeyed = grpc_error(lambda: triton_client.get_model_metadata(MODEL))
    assert unkeyed.status() == "StatusCode.UNAUTHENTICATED"


def _malformed(case: str, image: np.ndarray) -> service_pb2.ModelInferRequest:
    """A request with one problem (raw protobuf: tritonclient would refuse to build most)."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    raw = image.astype("<f4").tobytes()
    if case == "short":
        tensor.shape[0] = 2
    if case == "fp64":
        tensor.datatype = "FP64"
        tensor.contents.fp64_contents.extend(image.ravel().tolist())
    elif case == "negative":
        tensor.shape[0] = -1
    elif case == "unknown output":
        request.outputs.add(name="margin")
    if case in ("short", "extra raw", "negative", "unknown output"):
        request.raw_input_contents.append(raw)
    if case == "extra raw":
        request.raw_input_contents.append(raw)
    return request


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("short", "declares shape [2, 1, 28, 28] (1568 values) but carries 784 values"),
        ("fp64", "must have datatype FP32, not 'FP64'"),
        ("empty", "has neither contents nor an entry in raw_input_contents"),
        ("extra raw", "raw_input_contents has 2 entries for 1 inputs"),
        ("negative", "inputs.0.shape.0: Input should be greater than or equal to 0"),
        ("unknown output", "unknown output 'margin'; outputs are logits, label, score"),
    ],
)
def test_malformed_requests_are_invalid_arguments(
    channel: grpc.Channel, images: np.ndarray, case: str, message: str
) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_malformed(case, images[0]), metadata=tuple(KEY.items()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_grpc_calls_count_in_the_request_metrics(
    triton_client: triton.InferenceServerClient, http: httpx.Client, images: np.ndarray
) -> None:
    def count(model: str, status_class: str) -> float:
        text = http.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name == "marginwatch_requests_total"
                    and labels["endpoint"] == "grpc_model_infer"
                    and (labels["model"], labels["status_class"]) == (model, status_class)
                ):
                    return sample.value
        return 0.0

    before = (count(MODEL, "2xx"), count(MODEL, "4xx"), count("_unknown", "4xx"))
    triton_client.infer(MODEL, infer_inputs(images[:2]), headers=KEY)
    grpc_error(lambda: triton_client.infer(MODEL, infer_inputs(images[:1])))
    grpc_error(lambda: triton_client.infer("nope", infer_inputs(images[:1]), headers=KEY))
    after = (count(MODEL, "2xx"), count(MODEL, "4xx"), count("_unknown", "4xx"))
    # the keyless call is refused before its message is read: its model is not known
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 0, 2]


def test_every_domain_error_has_a_grpc_code() -> None:
    assert set(ServiceError.__subclasses__()) <= set(GRPC_STATUS_OF)
    assert set(GRPC_STATUS_OF) <= set(STATUS_OF)  # one table beside the other, same errors
    assert all(name in grpc.StatusCode.__members__ for name in GRPC_STATUS_OF.values())
    assert GRPC_STATUS_OF[Exception] == "INTERNAL"


# --- the stubs -------------------------------------------------------------------------------


def _fields(message: Any) -> dict[int, tuple[str, int, int, str]]:
    return {
        field.number: (field.name, field.type, field.label, field.type_name.rsplit(".", 1)[-1])
        for field in message.field
    }


def _walk(message: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A message and its nested messages, by dotted name."""
    yield prefix + message.name, message
    for nested in message.nested_type:
        yield from _walk(nested, f"{prefix}{message.name}.")


def test_shipped_proto_is_wire_compatible_with_tritons(
    shipped_proto: descriptor_pb2.FileDescriptorProto,
) -> None:
    """Same message and field numbers, names and types as tritonclient's grpc_service.proto;
    only `ModelMetadataResponse.properties` (the protocol's field 6) is ours alone."""
    theirs = descriptor_pb2.FileDescriptorProto.FromString(service_pb2.DESCRIPTOR.serialized_pb)
    their_messages = {message.name: message for message in theirs.message_type}

    theirs_all = dict(pair for message in their_messages.values() for pair in _walk(message))
    extra = []
    for name, ours in (pair for message in shipped_proto.message_type for pair in _walk(message)):
        if name not in theirs_all:
            extra.append(name)
            continue
        our_fields, their_fields = _fields(ours), _fields(theirs_all[name])
        for number, field in our_fields.items():
            if number in their_fields:
                assert field == their_fields[number], (name, field)
            else:
                extra.append(f"{name}.{field[0]}")
        assert set(their_fields) <= set(our_fields), name
    assert extra == ["ModelMetadataResponse.properties", "ModelMetadataResponse.PropertiesEntry"]
    (service,) = shipped_proto.service
    their_methods = {method.name: method for method in theirs.service[0].method}
    for method in service.method:
        assert (method.input_type, method.output_type) == (
            their_methods[method.name].input_type, their_methods[method.name].output_type,
        )  # fmt: skip


def test_shipped_stubs_are_generated_from_the_shipped_proto(
    shipped_proto: descriptor_pb2.FileDescriptorProto,
) -> None:
    """The descriptor embedded in the generated module is the .proto's (else: make grpc-stubs)."""
    tree = ast.parse((STUBS / "open_inference_grpc_pb2.py").read_text())
    (embedded,) = (
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "AddSerializedFile"
        and isinstance(node.args[0], ast.Constant)
    )
    compiled = descriptor_pb2.FileDescriptorProto()
    compiled.CopyFrom(shipped_proto)
    for message in (pair[1] for top in compiled.message_type for pair in _walk(top)):
        for field in message.field:
            field.ClearField("json_name")  # protoc's descriptor sets add it; the stubs leave it out
    assert descriptor_pb2.FileDescriptorProto.FromString(embedded) == compiled


def test_dependency_floors_cover_the_generated_code() -> None:
    """The generated modules refuse, at import, a grpcio or protobuf older than what generated
    them: pyproject's floors must be at least those."""
    grpc_module = (STUBS / "open_inference_grpc_pb2_grpc.py").read_text()
    (grpc_version,) = re.findall(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_module)
    pb2 = (STUBS / "open_inference_grpc_pb2.py").read_text()
    (protobuf_version,) = re.findall(r"# Protobuf Python Version: ([\d.]+)", pb2)
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    floors = dict(
        re.fullmatch(r"([\w-]+)>=([\d.]+).*", requirement).groups()  # type: ignore[union-attr]
        for requirement in project["dependencies"]
        if requirement.startswith(("grpcio>=", "protobuf>="))
    )

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("."))

    assert version(floors["grpcio"]) >= version(grpc_version)
    assert version(floors["protobuf"]) >= version(protobuf_version)


def test_grpc_is_imported_only_when_served() -> None:
    """A runtime property (the import sits in a function): torch's absence from the service
    is import-linter's contract (`make lint`)."""
    code = (
        "import sys\n"
        "from marginwatch.service.app import create_app\n"
        "from marginwatch.service.settings import Settings\n"
        "create_app(Settings(store='/nonexistent'))\n"
        "assert 'grpc' not in sys.modules\n"
        "create_app(Settings(store='/nonexistent', grpc_port=8001))\n"
        "assert 'marginwatch.service.grpc_server' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_call_shed_for_capacity_is_unavailable_and_counted_as_shed(
    store: Path,
    spawn_server: ServerFactory,
    tmp_path_factory: pytest.TempPathFactory,
    images: np.ndarray,
) -> None:
    """HTTP and gRPC share the process's body budget: while a stalled HTTP upload holds most of
    it (the bytes it sent), a ModelInfer call whose message does not fit the rest is shed,
    UNAVAILABLE with a retry message, and counted as shed for body bytes on its endpoint
    (besides its 5xx)."""
    held = 64 * 784 * 25 + 65536  # the largest JSON body the model takes (`payload.body_limit`)
    port, budget = free_port(), held + 10_000
    batch = images[:8]  # 25 kB of raw FP32: more than the 10 kB left
    with spawn_server(
        store,
        tmp_path_factory.mktemp("grpc-tight"),
        models=MODEL,
        reload_interval_s="0",
        grpc_port=str(port),
        max_inflight_body_bytes=str(budget),
        read_timeout_s="60",
        body_total_timeout_s="600",
    ) as server:
        host, http_port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(http_port))) as hog:
            sent = held - 100  # charged as they arrive: all but the last bytes are sent
            hog.sendall(
                f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: test\r\nContent-Type: "
                f"application/json\r\nContent-Length: {held}\r\n\r\n".encode()
                + b'{"inputs": ['
                + b" " * (sent - 12)
            )
            deadline = time.monotonic() + 30
            while total(scrape(server.url), "marginwatch_admission_body_bytes") < sent:
                assert time.monotonic() < deadline, "the upload's bytes were never reserved"
                time.sleep(0.05)
            client = triton.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                error = grpc_error(lambda: client.infer(MODEL, infer_inputs(batch)))
            finally:
                client.close()
        samples = scrape(server.url)
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert "retry later" in str(error.message())
    shed = value(samples, "marginwatch_requests_shed_total",
                 model=MODEL, endpoint="grpc_model_infer", reason="body_bytes")  # fmt: skip
    assert shed == 1
    assert value(samples, "marginwatch_requests_total",
                 model=MODEL, endpoint="grpc_model_infer", status_class="5xx") == 1  # fmt: skip
