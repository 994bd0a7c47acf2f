"""The Open Inference Protocol's gRPC messages (`oip_grpc/`) to and from the v2 route's own types,
as MLServer's `grpc/converters.py`: a `ModelInferRequest` becomes the very
`schemas.InferenceRequest` an HTTP body becomes, its `raw_input_contents` playing the binary
tensor extension's part and typed `contents` the JSON `data`; a `Prediction` becomes a
`ModelInferResponse` written from the v2 route's output table, as raw bytes
(`raw_output_contents`) for a request that came raw, as typed `contents` for one that came typed.
Nothing here holds state or knows the transport; the servicer (`grpc_servicer.py`) calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from marginwatch.service.decoding import validate
from marginwatch.service.deployment import Deployment
from marginwatch.service.engine import INPUT_DATATYPE, Prediction, TensorSpec, calibration_facts
from marginwatch.service.errors import InvalidInput
from marginwatch.service.oip_grpc import open_inference_grpc_pb2 as pb
from marginwatch.service.routes_v2 import Asked, raw_tensor
from marginwatch.service.schemas import InferenceRequest

# The `InferTensorContents` field that holds each datatype's typed values (the protocol's table;
# the outputs are written with it)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# --- request --------------------------------------------------------------------------------


def parameter_values(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A protobuf parameter map as the plain values a JSON body would carry."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def typed_values(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray | None:
    """A tensor's typed `contents` as a flat float32 array; None for any datatype but the one the
    models take (`input_array` then refuses the datatype, in the v2 route's words)."""
    if tensor.datatype != INPUT_DATATYPE:
        return None
    # one C-level copy: upb's repeated fields convert without a Python loop (36 µs for 32 images)
    return np.asarray(tensor.contents.fp32_contents, dtype=np.float32)


def as_inference_request(request: pb.ModelInferRequest) -> tuple[InferenceRequest, memoryview]:
    """The request as the v2 route's `InferenceRequest` and binary part: `raw_input_contents`
    become binary tensor data (each input's `binary_data_size` its entry's length), typed
    `contents` become `data`. The schema's checks (datatypes, shapes) apply as to a JSON body."""
    raw = list(request.raw_input_contents)  # reading an entry copies it out: once only
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send "
            "one per input, in the order of `inputs`"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": parameter_values(tensor.parameters),
        }
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {tensor.name!r} has typed contents in a request with "
                    "raw_input_contents: send one or the other"
                )
            entry["parameters"]["binary_data_size"] = len(raw[index])
        elif tensor.HasField("contents"):
            entry["data"] = typed_values(tensor)
        else:  # said in gRPC's words (the v2 check would speak of `data` and binary_data_size)
            raise InvalidInput(
                f"input {tensor.name!r} has neither contents nor an entry in raw_input_contents"
            )
        inputs.append(entry)
    document: dict[str, Any] = {
        "id": request.id or None,
        "parameters": parameter_values(request.parameters),
        "inputs": inputs,
    }
    if request.outputs:
        document["outputs"] = [
            {"name": output.name, "parameters": parameter_values(output.parameters)}
            for output in request.outputs
        ]
    binary = memoryview(raw[0]) if len(raw) == 1 else memoryview(b"".join(raw))
    return validate(InferenceRequest, document), binary


# --- response -------------------------------------------------------------------------------


def set_parameter(parameter: pb.InferParameter, value: object) -> None:
    if isinstance(value, bool):  # before int: a bool is an int
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def response_header(deployment: Deployment) -> pb.ModelInferResponse:
    """What a response of this version always carries: the v2 route's header fields."""
    record = deployment.model.record
    header = pb.ModelInferResponse(model_name=deployment.model.name, model_version=record.version)
    for key, value in calibration_facts(record).items():
        set_parameter(header.parameters[key], value)
    return header


def infer_response(
    header: pb.ModelInferResponse, request_id: str, prediction: Prediction, asked: Asked, raw: bool
) -> pb.ModelInferResponse:
    """The response: `header`'s fields and the outputs, as raw bytes or typed contents."""
    response = pb.ModelInferResponse()
    response.CopyFrom(header)
    response.id = request_id
    for spec, _ in asked:  # the binary flag is HTTP's: here the request's own form decides
        array: np.ndarray = getattr(prediction, spec.field)
        tensor = response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(raw_tensor(spec, array))
        else:
            getattr(tensor.contents, CONTENTS_FIELD[spec.datatype]).extend(array.ravel().tolist())
    return response


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatype, shape=spec.shape
        )
        for spec in specs
    ]
