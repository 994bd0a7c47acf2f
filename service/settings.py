"""The service's one settings class: environment variables with the prefix `MARGINWATCH_`.

Every field is documented and constrained, units are in the names, and a bad value fails at
start-up with pydantic's message naming the field. Lists (`MARGINWATCH_MODELS`,
`MARGINWATCH_API_KEYS`) are comma-separated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from marginwatch.artifact.store import default_store

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
Device = Literal["auto", "cpu", "cuda"]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of one `marginwatch-serve` process."""

    model_config = SettingsConfigDict(env_prefix="MARGINWATCH_", extra="forbid", frozen=True)

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
        "what is queued at once (batches still form while the model executes)",
    )
    inline_max_samples: int = Field(
        default=64,
        ge=0,
        description="batches of at most this many samples run on the event loop's thread, not "
        "in the model's thread: faster for small models on few CPU cores (measured: "
        "docs/benchmarks.md), but the loop waits for the batch; set 0 on a GPU or for models "
        "that take milliseconds per batch",
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
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="largest request body accepted, in bytes"
    )
    reload_interval_s: float = Field(
        default=5.0, ge=0, description="how often CURRENT pointers are polled; 0 turns reload off"
    )
    live_window_predictions: int = Field(
        default=1000,
        gt=0,
        description="served predictions in the rolling window of the live robust-accuracy gauge",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="accepted API keys (comma-separated); empty: no authentication",
    )
    protect_health: bool = Field(default=False, description="require an API key for /v2/health/*")
    protect_metrics: bool = Field(default=False, description="require an API key for /metrics")
    shutdown_timeout_s: float = Field(
        default=30.0, gt=0, description="how long shutdown waits for requests in flight"
    )
    log_format: LogFormat = Field(default="text", description="text for people, json for machines")
    log_level: LogLevel = Field(default="info", description="lowest level logged")
    access_log: bool = Field(default=False, description="log one line per request (uvicorn's)")

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(len(key.get_secret_value()) < 8 for key in keys):
            raise ValueError("every API key needs at least 8 characters")
        return keys

    @model_validator(mode="after")
    def _request_fits_batch(self) -> Settings:
        if self.max_inputs_per_request > self.max_batch_size:
            raise ValueError(
                f"max_inputs_per_request ({self.max_inputs_per_request}) must not exceed "
                f"max_batch_size ({self.max_batch_size})"
            )
        if self.max_batch_size > self.max_queue_samples:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must not exceed "
                f"max_queue_samples ({self.max_queue_samples})"
            )
        return self
