"""The served model: one verified calibration version and its ONNX Runtime session.

`ServedModel` follows the load/predict split: the constructor only stores where the version lies;
`load()` verifies the artifact (schema and sha256, through `artifact.store.read_record`),
creates the session and runs it once; `predict(x)` returns a `Prediction`. The score comes out of
the graph itself (output `score`); the engine only compares it with λ, by the one flag rule
(`artifact.flags`, the calibration's too). `SERVED_OUTPUTS` is the one table of the output tensors
a client can ask for (name, datatype, shape, `Prediction` field): the model metadata and both of
the Open Inference Protocol's encodings read it. Nothing here knows HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from marginwatch.artifact import flags
from marginwatch.artifact.answers import Answers, answers_of, runner_up
from marginwatch.artifact.graph import INPUT_NAME, LOGITS, OUTPUTS, SCORE
from marginwatch.artifact.schema import ONNX_FILE, CalibrationRecord
from marginwatch.artifact.store import ArtifactError, read_record
from marginwatch.service.errors import ModelNotReady

PLATFORM = "onnxruntime_onnx"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
OUTPUT_NAMES: Final = list(OUTPUTS)  # what each `session.run` fetches


@dataclass(frozen=True)
class EngineOptions:
    """How sessions are created: provider choice and thread counts (0: ORT's default)."""

    device: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 1


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs µs on every request
class Prediction:
    """Per-sample results of one execution; every array has the batch as its first axis. The
    flags and `p_robust` are at the grid budget `budget` (`artifact.answers`); the margin's
    estimate and bounds and the runner-up do not depend on a budget."""

    logits: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    brittle: np.ndarray
    borderline: np.ndarray
    p_robust: np.ndarray
    margin_estimate: np.ndarray
    margin_low: np.ndarray
    margin_high: np.ndarray
    runner_up: np.ndarray
    budget: int

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def without_answers(
        cls,
        logits: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        brittle: np.ndarray,
        borderline: np.ndarray,
    ) -> Prediction:
        """A prediction whose calibration has no grid or margin curves (NaN answers), at its
        only budget: what a toy model in a test or benchmark gives."""
        nan = np.full(len(labels), np.nan, dtype=np.float32)
        # a toy's labels need not index its logits: no runner-up, the label stands in
        return cls(logits, scores, labels, brittle, borderline, nan, nan, nan, nan, labels, 0)

    def take(self, start: int, stop: int) -> Prediction:
        """The samples `start:stop`, as views (no copy)."""
        return Prediction(
            self.logits[start:stop],
            self.scores[start:stop],
            self.labels[start:stop],
            self.brittle[start:stop],
            self.borderline[start:stop],
            self.p_robust[start:stop],
            self.margin_estimate[start:stop],
            self.margin_low[start:stop],
            self.margin_high[start:stop],
            self.runner_up[start:stop],
            self.budget,
        )

    def at_budget(self, answers: Answers, budget: int, guard_band: float) -> Prediction:
        """The same samples answered at grid budget `budget`: its λ's flags, its p_robust."""
        if budget == self.budget:
            return self
        threshold = answers.budgets[budget].threshold
        return Prediction(
            self.logits,
            self.scores,
            self.labels,
            flags.brittle(self.scores, threshold),
            flags.borderline(self.scores, threshold, guard_band),
            answers.p_robust(self.scores, budget),
            self.margin_estimate,
            self.margin_low,
            self.margin_high,
            self.runner_up,
            budget,
        )

    def probabilities(self) -> np.ndarray:
        """Softmax of the logits, computed in float64 for stability."""
        shifted = self.logits.astype(np.float64) - self.logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor a client may ask for, in Open Inference Protocol terms."""

    name: str
    datatype: str
    field: str  # the `Prediction` attribute that holds it
    per_class: bool = False  # shape [N, classes] instead of [N]

    def shape(self, classes: int) -> list[int]:
        return [-1, classes] if self.per_class else [-1]


INPUT_DATATYPE: Final = "FP32"
# In the order responses list them when a client asks for no particular outputs.
SERVED_OUTPUTS: Final = (
    OutputSpec(LOGITS, "FP32", "logits", per_class=True),
    OutputSpec("label", "INT64", "labels"),
    OutputSpec(SCORE, "FP32", "scores"),
    OutputSpec("brittle", "BOOL", "brittle"),
    OutputSpec("borderline", "BOOL", "borderline"),
    OutputSpec("p_robust", "FP32", "p_robust"),
    OutputSpec("margin_estimate", "FP32", "margin_estimate"),
    OutputSpec("margin_low", "FP32", "margin_low"),
    OutputSpec("margin_high", "FP32", "margin_high"),
    OutputSpec("runner_up", "INT64", "runner_up"),
)


@dataclass(frozen=True)
class ModelMetadata:
    """What clients may know about a loaded version (OIP model metadata plus calibration facts)."""

    name: str
    version: str
    platform: str
    providers: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    calibration: dict[str, Any]


def choose_providers(device: str) -> list[str]:
    """CUDA first when asked for (or `auto`) and available, then CPU."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ArtifactError(
            "device=cuda, but ONNX Runtime offers no CUDA provider (install onnxruntime-gpu)"
        )
    if device in ("auto", "cuda") and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def iso_timestamp_s(iso: str) -> float:
    """An ISO 8601 time as seconds since the epoch (0 when it cannot be parsed)."""
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def calibration_timestamp_s(record: CalibrationRecord) -> float:
    """`created_at` as seconds since the epoch (0 when it cannot be parsed)."""
    return iso_timestamp_s(record.created_at)


class ServedModel:
    """One calibration version of one model, loaded into an ONNX Runtime session."""

    def __init__(self, name: str, version_dir: Path, options: EngineOptions) -> None:
        self.name = name
        self.version_dir = version_dir
        self.options = options
        self._loaded: tuple[CalibrationRecord, ort.InferenceSession] | None = None
        self.answers = Answers((), 0, None)  # the loaded version's (`load`)
        self._threshold = np.asarray(np.nan)  # the loaded version's λ (`load`)

    @property
    def version(self) -> str:
        return self.version_dir.name

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    def _require(self) -> tuple[CalibrationRecord, ort.InferenceSession]:
        if self._loaded is None:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not loaded")
        return self._loaded

    @property
    def record(self) -> CalibrationRecord:
        return self._require()[0]

    def load(self) -> None:
        """Verify the artifact and open its session; raise `ArtifactError` on any problem."""
        record = read_record(self.version_dir)
        if record.model_name != self.name or record.version != self.version:
            raise ArtifactError(
                f"{self.version_dir} holds {record.model_name!r} version {record.version!r}, "
                f"not {self.name!r} version {self.version!r}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.options.intra_op_threads
        options.inter_op_num_threads = self.options.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = choose_providers(self.options.device)
        try:
            session = ort.InferenceSession(
                str(self.version_dir / ONNX_FILE), options, providers=providers
            )
        except Exception as error:  # ORT raises its own exception types, none exported stably
            raise ArtifactError(f"ONNX Runtime cannot load {self.version_dir}: {error}") from error
        _check_graph(session, record)
        self.answers = answers_of(record)
        # λ as the float64 array the flag rule compares with, made once rather than per batch
        self._threshold = np.asarray(record.threshold, dtype=np.float64)
        self._loaded = (record, session)

    def predict(self, x: np.ndarray) -> Prediction:
        """Labels, logits, scores and flags of a float32 batch N×C×H×W (already validated)."""
        record, session = self._require()
        logits, scores = session.run(OUTPUT_NAMES, {INPUT_NAME: x})
        answers = self.answers
        labels = logits.argmax(axis=1)
        p_robust, low, estimate, high = answers.served_answers(scores)
        threshold = self._threshold
        return Prediction(
            logits,
            scores,
            labels,
            flags.brittle(scores, threshold),
            flags.borderline(scores, threshold, record.guard_band),
            p_robust,
            estimate,
            low,
            high,
            runner_up(logits, labels),
            answers.served,
        )

    def metadata(self) -> ModelMetadata:
        record, session = self._require()
        batch_shape = [-1, *record.input_shape]
        return ModelMetadata(
            name=self.name,
            version=self.version,
            platform=PLATFORM,
            providers=list(session.get_providers()),
            inputs=[TensorSpec(INPUT_NAME, INPUT_DATATYPE, batch_shape)],
            outputs=[
                TensorSpec(out.name, out.datatype, out.shape(len(record.class_names)))
                for out in SERVED_OUTPUTS
            ],
            calibration={**calibration_facts(record), **grid_facts(self.answers)},
        )


def calibration_facts(record: CalibrationRecord) -> dict[str, Any]:
    """The calibration facts a response carries in its `parameters`."""
    return {
        "calibration_version": record.version,
        "threshold": record.threshold,
        "guard_band": record.guard_band,
        "score_kind": record.score_kind,
        "threat_model": f"{record.threat_model.norm} eps={record.threat_model.eps:g}",
        "eps": record.threat_model.eps,
        "robust_accuracy": record.robust_accuracy.estimate,
        "precision_not_brittle": record.precision_not_brittle,
        "calibrated_at": record.created_at,
    }


def grid_facts(answers: Answers) -> dict[str, Any]:
    """The model metadata's budget grid: what a request may ask for with `eps`, and what the
    calibration measured at each budget."""
    return {
        "eps_grid": answers.grid,
        "budgets": [
            {"eps": b.eps, "threshold": b.threshold, "robust_accuracy": b.robust_accuracy}
            for b in answers.budgets
        ],
        "margin_interval": None if answers.margin is None else answers.margin.interval,
    }


def _check_graph(session: ort.InferenceSession, record: CalibrationRecord) -> None:
    """The graph must honour the serving contract, and run once on a zero input."""
    inputs = [node.name for node in session.get_inputs()]
    outputs = {node.name for node in session.get_outputs()}
    if inputs != [INPUT_NAME] or not {LOGITS, SCORE} <= outputs:
        raise ArtifactError(
            f"the graph has inputs {inputs} and outputs {sorted(outputs)}; the service needs "
            f"input {INPUT_NAME!r} and outputs {LOGITS!r}, {SCORE!r}"
        )
    probe = np.zeros((2, *record.input_shape), dtype=np.float32)
    try:
        logits, scores = session.run(list(OUTPUTS), {INPUT_NAME: probe})
    except Exception as error:
        raise ArtifactError(f"the graph fails on a zero input: {error}") from error
    if logits.shape != (2, len(record.class_names)) or scores.shape != (2,):
        raise ArtifactError(
            f"on a batch of 2 the graph gives logits {logits.shape} and score {scores.shape}; "
            f"expected (2, {len(record.class_names)}) and (2,)"
        )
