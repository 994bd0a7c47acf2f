"""The service's one settings class: environment variables with the prefix `MARGINWATCH_`.

Every field is documented and constrained, units are in the names, and a bad value fails at
start-up with pydantic's message naming the field and never quoting the value: API keys are
`SecretStr`, and a bad one is named by its position. Lists (`MARGINWATCH_MODELS`,
`MARGINWATCH_API_KEYS`) are comma-separated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from marginwatch.artifact.store import default_store

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
Device = Literal["auto", "cpu", "cuda"]
# The rate that setting traffic_dir alone samples at: about 1 in 100 inputs, which a day of
# modest traffic turns into the few hundred points a check attacks, at 1 % of the request rate
# in disk writes.
DEFAULT_TRAFFIC_SAMPLE_RATE: Final = 0.01
# Classes with a `class` label value of their own in marginwatch_predictions_total: two series
# per value, model and replica, so a 1,000-class model stays at tens of series by default.
DEFAULT_CLASS_LABELS: Final = 20
# The image requests' limits (`images.ImageLimits` takes them as its defaults). The byte limits
# keep an image request's body, as base64 in JSON, under the largest float request of the smallest
# shipped model (64 samples of 1×28×28 as JSON: 1.26 MB, `payload.body_limit`), so that taking
# images enlarges no body limit by default; a 28×28 PNG takes about 1 KB.
MAX_IMAGE_BYTES: Final = 512 * 1024
MAX_IMAGE_REQUEST_BYTES: Final = 768 * 1024
MAX_IMAGE_PIXELS: Final = 2048 * 2048


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of one `marginwatch-serve` process."""

    # hide_input_in_errors: a ValidationError's text would otherwise quote the raw input, API
    # keys included, to whoever prints it (our CLI formats its own message, see __main__.py)
    model_config = SettingsConfigDict(
        env_prefix="MARGINWATCH_", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    store: Path = Field(
        default_factory=default_store,
        description="artifact store: `<store>/<model>/<version>/` plus `<store>/<model>/CURRENT`",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="models to serve (comma-separated); empty: every model in the store with a "
        "CURRENT pointer, including ones published later",
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="interface to listen on")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on")
    grpc_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="TCP port for the Open Inference Protocol over gRPC (KServe's and Triton's "
        "inference.GRPCInferenceService; KServe's convention is 8001), on the same host and "
        "models; 0: no gRPC",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="TCP port of a separate /metrics listener (same host), so that a NetworkPolicy "
        "can let only the monitoring namespace reach the metrics and not the API; the API port "
        "then has no /metrics. 0: /metrics on the API port",
    )
    device: Device = Field(
        default="auto",
        description="execution provider: auto takes CUDA when onnxruntime-gpu sees a GPU, else CPU",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="ONNX Runtime threads inside one operator; 0: ORT's default",
    )
    inter_op_threads: int = Field(
        default=1,
        ge=0,
        le=256,
        description="ONNX Runtime threads across operators; 0: ORT's default",
    )
    max_batch_size: int = Field(
        default=64, gt=0, le=4096, description="most samples one model execution takes"
    )
    max_batch_wait_s: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="how long a batch waits to fill once its first request is queued; 0 runs "
        "what is queued at once (batches still form while the model executes; a batch headed "
        "by a gRPC call still waits up to 1 ms for the gRPC calls in progress)",
    )
    inline_max_samples: int = Field(
        default=64,
        ge=0,
        description="batches of at most this many samples run on the event loop's thread, not "
        "in the model's thread: faster for small models on few CPU cores (measured: "
        "docs/benchmarks.md), but the loop waits for the batch; set 0 on a GPU or for models "
        "that take milliseconds per batch. Under overload (requests waiting for admission, or "
        "queued behind the batch) every batch runs in the model's thread",
    )
    max_queue_samples: int = Field(
        default=4096,
        gt=0,
        description="samples waiting per model; above this, requests are refused at once "
        "(overloaded: retry later)",
    )
    max_inputs_per_request: int = Field(
        default=64, gt=0, description="most samples in one request (at most max_batch_size)"
    )
    max_body_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="a cap on request bodies, in bytes; unset: each model's limit is its largest "
        "legal request (max_inputs_per_request samples of its input shape, as JSON or binary; "
        "for image files, max_image_request_bytes of them)",
    )
    max_image_bytes: int = Field(
        default=MAX_IMAGE_BYTES,
        ge=1024,
        description="bytes of one image file (PNG, JPEG or WebP, as decoded from base64) in a "
        "v1 request; a larger one is refused (413) before it is decoded",
    )
    max_image_request_bytes: int = Field(
        default=MAX_IMAGE_REQUEST_BYTES,
        ge=1024,
        description="bytes of the image files of one v1 request together; also the body limit "
        "of image requests (these bytes as a multipart form or as base64 in JSON, plus part "
        "headers); the default keeps that under the JSON float limit of a 1×28×28 model",
    )
    max_image_pixels: int = Field(
        default=MAX_IMAGE_PIXELS,
        gt=0,
        le=1 << 26,
        description="width × height of one image, read from its file's header before it is "
        "decoded: a small file claiming more (a decompression bomb) is refused (413); decoding "
        "takes up to 4 bytes a pixel, in one thread",
    )
    max_inflight_body_bytes: int = Field(
        default=96 * 1024 * 1024,
        ge=1024 * 1024,
        description="request body bytes the process holds at once: a request's bytes are "
        "charged as they arrive, and it is refused (503) when they do not fit (413 at once if "
        "its Content-Length never could); peak memory grows by about 1.5 times this "
        "(docs/benchmarks.md sizes it for a container)",
    )
    max_inflight_requests: int = Field(
        default=128,
        gt=0,
        description="inference requests being parsed, queued or run at once (the default: two "
        "full batches of one-sample requests, one running and one forming); a request takes its "
        "place once its body has arrived, and waits for one if none is free",
    )
    max_waiting_requests: int = Field(
        default=1024,
        ge=0,
        description="inference requests that may wait for a place; more are refused at once (503)",
    )
    request_timeout_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="a request's batch must start within this many seconds of its arrival; "
        "one that cannot (waiting for a place, or in its model's queue) is refused (503) and "
        "never run",
    )
    read_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="a client has this long to send a request's headers (from its first byte, or "
        "from connecting), and may not pause longer while sending a body; else it is disconnected",
    )
    body_total_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="a request's whole body must arrive within this many seconds of its "
        "headers, however steadily it trickles in; else it is answered 408 and the connection "
        "closed",
    )
    reload_interval_s: float = Field(
        default=5.0, ge=0, description="how often CURRENT pointers are polled; 0 turns reload off"
    )
    reload_retry_min_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="a refused version is tried again at the first poll after its CURRENT "
        "pointer or its files change, else after this backoff, doubled at each refusal",
    )
    reload_retry_max_s: float = Field(
        default=300.0, gt=0, le=86400, description="longest backoff (at least reload_retry_min_s)"
    )
    live_window_predictions: int = Field(
        default=1000,
        gt=0,
        description="served predictions in the rolling window of the live robust-accuracy gauge",
    )
    live_window_s: float = Field(
        default=600.0,
        gt=0,
        le=7 * 86400,
        description="the live window also forgets predictions older than this, so that a quiet "
        "replica's gauge empties (marginwatch_live_window_predictions falls) instead of freezing",
    )
    class_labels: int = Field(
        default=DEFAULT_CLASS_LABELS,
        ge=1,
        le=1000,
        description="predicted classes counted under their own `class` label in "
        "marginwatch_predictions_total: a version with more counts the ones its calibration saw "
        "predicted most, and the rest as `other`",
    )
    traffic_sample_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="fraction of served inputs written, with their label, score, flag and "
        "calibration version, to traffic_dir for the calibration job's check of the flag; the "
        f"inputs are user data. Unset: {DEFAULT_TRAFFIC_SAMPLE_RATE:g} when traffic_dir is set, "
        "else 0 (off); 0 with traffic_dir set samples nothing and warns at start-up",
    )
    traffic_dir: Path | None = Field(
        default=None,
        description="writable folder for sampled traffic (`<dir>/<model>/<UTC day>/*.npz`), "
        "never the store; setting it turns sampling on (see traffic_sample_rate)",
    )
    traffic_max_bytes_per_day: int = Field(
        default=256 * 1024 * 1024,
        ge=1024 * 1024,
        description="per model and UTC day, samples beyond this many bytes in traffic_dir (all "
        "replicas together) are dropped",
    )
    traffic_retention_days: int = Field(
        default=7,
        ge=1,
        le=366,
        description="day folders of sampled traffic older than this many days are deleted",
    )
    traffic_file_mode: str = Field(
        default="0600",
        pattern=r"^0?[0-7]{3}$",
        description="permissions of sampled traffic files, in octal: they hold user inputs, so "
        "only their owner may read them by default (e.g. 0640 for a job of another user in the "
        "same group); their model and day folders get search rights where reading is allowed",
    )
    traffic_queue_samples: int = Field(
        default=4096,
        gt=0,
        description="sampled inputs waiting for the writer thread; more are dropped (counted)",
    )
    traffic_shard_samples: int = Field(
        default=1024, gt=0, description="samples per shard file, at most (one version per shard)"
    )
    traffic_flush_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="a shard is written once its oldest sample waited this long, even if not full",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys (comma-separated, each at least 8 characters; never "
        "printed, a bad one is named by its position); empty: no authentication",
    )
    protect_health: bool = Field(default=False, description="require an API key for /v2/health/*")
    protect_metrics: bool = Field(default=False, description="require an API key for /metrics")
    public_docs: bool = Field(
        default=False,
        description="with api_keys set, leave /docs, /redoc and /openapi.json open to clients "
        "without a key (they describe the API, not its data); without keys they are always open",
    )
    shutdown_timeout_s: float = Field(
        default=30.0, gt=0, description="how long shutdown waits for requests in flight"
    )
    log_format: LogFormat = Field(default="text", description="text for people, json for machines")
    log_level: LogLevel = Field(default="info", description="lowest level logged")
    access_log: bool = Field(default=False, description="log one line per request (uvicorn's)")

    @model_validator(mode="before")
    @classmethod
    def _folder_turns_sampling_on(cls, data: Any) -> Any:
        """A traffic folder without a rate samples at the default rate: setting the folder is
        how a user asks for sampling. An explicit rate, 0 included, is kept."""
        if (
            isinstance(data, dict)
            and data.get("traffic_dir") not in (None, "")
            and data.get("traffic_sample_rate") is None
        ):
            return {**data, "traffic_sample_rate": DEFAULT_TRAFFIC_SAMPLE_RATE}
        return data

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("traffic_file_mode")
    @classmethod
    def _file_mode_lets_the_owner_write(cls, mode: str) -> str:
        bits = int(mode, 8)
        if bits & 0o600 != 0o600 or bits & 0o111:
            raise ValueError(
                f"traffic_file_mode {mode}: the owner must read and write (6 first) and no one "
                "may execute (no odd digit)"
            )
        return mode

    @property
    def traffic_file_mode_bits(self) -> int:
        return int(self.traffic_file_mode, 8)

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: list[SecretStr]) -> list[SecretStr]:
        # the message names entries by position: a key, even a bad one, must never be printed
        short = [str(i) for i, key in enumerate(keys, 1) if len(key.get_secret_value()) < 8]
        if short:
            entries = f"entr{'y' if len(short) == 1 else 'ies'} {', '.join(short)}"
            raise ValueError(
                f"every API key needs at least 8 characters; too short: {entries} of {len(keys)}"
            )
        return keys

    @model_validator(mode="after")
    def _request_fits_batch(self) -> Settings:
        if self.max_inputs_per_request > self.max_batch_size:
            raise ValueError(
                f"max_inputs_per_request ({self.max_inputs_per_request}) must not exceed "
                f"max_batch_size ({self.max_batch_size})"
            )
        if self.max_image_bytes > self.max_image_request_bytes:
            raise ValueError(
                f"max_image_bytes ({self.max_image_bytes}) must not exceed "
                f"max_image_request_bytes ({self.max_image_request_bytes})"
            )
        if self.max_batch_wait_s >= self.request_timeout_s:
            raise ValueError(
                f"max_batch_wait_s ({self.max_batch_wait_s}) must be below request_timeout_s "
                f"({self.request_timeout_s}): a batch waiting to fill would outlast its requests"
            )
        if self.max_batch_size > self.max_queue_samples:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must not exceed "
                f"max_queue_samples ({self.max_queue_samples})"
            )
        if self.metrics_port and self.protect_metrics:
            raise ValueError(
                "protect_metrics needs /metrics on the API port: the separate metrics_port "
                f"({self.metrics_port}) takes no API keys (restrict it with a NetworkPolicy)"
            )
        if self.metrics_port and self.metrics_port in {self.port, self.grpc_port}:
            raise ValueError(f"metrics_port ({self.metrics_port}) is already the API's or gRPC's")
        if self.traffic_sample_rate > 0 and self.traffic_dir is None:
            raise ValueError(
                f"traffic_sample_rate ({self.traffic_sample_rate}) needs traffic_dir: a writable "
                "folder outside the store"
            )
        if self.traffic_dir is not None and self.traffic_dir.resolve() == self.store.resolve():
            raise ValueError(
                "traffic_dir must not be the store: shards would sit beside calibration versions"
            )
        if self.reload_retry_min_s > self.reload_retry_max_s:
            raise ValueError(
                f"reload_retry_min_s ({self.reload_retry_min_s}) must not exceed "
                f"reload_retry_max_s ({self.reload_retry_max_s})"
            )
        return self
