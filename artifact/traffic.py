"""Sampled live traffic, the contract between the service that writes it and the calibration job
that checks the flag on it: the shard files, and `traffic-check.json`, the label-free check the
job publishes next to a served version.

Layout under the traffic folder (``MARGINWATCH_TRAFFIC_DIR``, never the store: serving pods
mount the store read-only)::

    <traffic>/<model>/<YYYY-MM-DD>/<HHMMSS>-<host>-<pid>-<seq>.npz

The day is the UTC day of the shard's first sample. A shard is written under a hidden name and
renamed into place, so a reader never sees a half-written one: names starting with ``.`` are
skipped. A shard is a plain ``.npz`` read with ``allow_pickle=False``; what it holds is user
data (the inputs as served), which is why sampling is off by default.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import shutil
import socket
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from marginwatch.artifact.schema import NAME_PATTERN, AttackBudget, ThreatModel
from marginwatch.artifact.store import fsync_dir

TRAFFIC_DIR_ENV: Final = "MARGINWATCH_TRAFFIC_DIR"
TRAFFIC_CHECK_FILE: Final = "traffic-check.json"
SHARD_SUFFIX: Final = ".npz"
_ARRAYS: Final = ("inputs", "labels", "scores", "brittle", "times")


class TrafficError(Exception):
    """A shard that cannot be read: truncated, not an npz, or arrays that do not fit together."""


@dataclass(frozen=True)
class TrafficShard:
    """Served predictions, one row per input, in the order they were served."""

    model: str
    version: str  # the calibration version that served them
    inputs: np.ndarray  # float32 [n, *input_shape], as the model received them
    labels: np.ndarray  # int64 [n], the served label
    scores: np.ndarray  # float32 [n], the served score
    brittle: np.ndarray  # bool [n], the served flag
    times: np.ndarray  # float64 [n], unix seconds when served

    def __post_init__(self) -> None:
        n = len(self.inputs)
        for name in _ARRAYS[1:]:
            array = getattr(self, name)
            if array.ndim != 1 or len(array) != n:
                raise TrafficError(f"{name} has shape {array.shape}; wanted ({n},)")
        if n == 0:
            raise TrafficError("a shard holds at least one sample")

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in _ARRAYS)


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def day_folder(root: Path, model: str, seconds: float) -> Path:
    return root / model / _utc(seconds).strftime("%Y-%m-%d")


# Shards hold user inputs: readable by their writer alone unless the operator widens it (the
# service and the calibration job run as one user in the shipped manifests).
DEFAULT_FILE_MODE: Final = 0o600
_DAY_NAME: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


def folder_mode(file_mode: int) -> int:
    """The mode of the folders that hold files of `file_mode`: search where read is allowed."""
    return file_mode | ((file_mode & 0o444) >> 2)


def _private_folder(folder: Path, mode: int) -> None:
    folder.mkdir(exist_ok=True)
    os.chmod(folder, mode)  # mkdir's mode is cut by the umask; this one is exact


def write_shard(
    root: Path, shard: TrafficShard, *, seq: int, file_mode: int = DEFAULT_FILE_MODE
) -> Path:
    """Write `shard` atomically (`write_atomically`) with `file_mode`, in model and day folders
    of `folder_mode(file_mode)`, and return its path. `root` is the operator's, left as it is."""
    folder = day_folder(root, shard.model, float(shard.times[0]))
    root.mkdir(parents=True, exist_ok=True)
    for level in (folder.parent, folder):
        _private_folder(level, folder_mode(file_mode))
    # the host name as well as the pid: replicas share the folder, and in containers every
    # replica's server is often the same pid (1)
    writer = f"{socket.gethostname()}-{os.getpid()}"
    name = f"{_utc(float(shard.times[0])):%H%M%S}-{writer}-{seq:08d}{SHARD_SUFFIX}"
    buffer = io.BytesIO()
    np.savez(
        buffer,
        model=np.array(shard.model),
        version=np.array(shard.version),
        inputs=np.ascontiguousarray(shard.inputs, dtype=np.float32),
        labels=np.asarray(shard.labels, dtype=np.int64),
        scores=np.asarray(shard.scores, dtype=np.float32),
        brittle=np.asarray(shard.brittle, dtype=bool),
        times=np.asarray(shard.times, dtype=np.float64),
    )
    final = folder / name
    write_atomically(final, buffer.getvalue(), mode=file_mode)
    return final


def read_shard(path: Path) -> TrafficShard:
    """Load one shard; `TrafficError` names what is wrong with a broken one."""
    try:
        # our own handle: np.load leaves the one it opens unclosed when the zip is truncated
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
            missing = {"model", "version", *_ARRAYS} - set(data.files)
            if missing:
                raise TrafficError(f"{path} lacks {sorted(missing)}")
            return TrafficShard(
                model=str(data["model"]),
                version=str(data["version"]),
                inputs=data["inputs"].astype(np.float32, copy=False),
                labels=data["labels"].astype(np.int64, copy=False),
                scores=data["scores"].astype(np.float32, copy=False),
                brittle=data["brittle"].astype(bool, copy=False),
                times=data["times"].astype(np.float64, copy=False),
            )
    except TrafficError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise TrafficError(f"{path} is not a readable traffic shard: {error}") from error


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _day_shards(day: Path) -> list[Path]:
    """The complete shards of one day folder, by name (the first sample's time first)."""
    return [p for p in _visible(day) if p.suffix == SHARD_SUFFIX and p.is_file()]


def _days(root: Path, model: str) -> list[Path]:
    """The day folders of `model`, oldest first: folders named as `day_folder` names them
    (`YYYY-MM-DD`), never another folder an operator put beside them."""
    base = root / model
    if not base.is_dir():
        return []
    return [p for p in _visible(base) if _DAY_NAME.fullmatch(p.name) and p.is_dir()]


def list_shards(root: Path, model: str, since: float | None = None) -> list[Path]:
    """Complete shards of `model`, oldest first; with `since`, only day folders that can hold
    samples served at or after it (filter the samples by their `times` when reading)."""
    first_day = _utc(since).strftime("%Y-%m-%d") if since is not None else ""
    days = [day for day in _days(root, model) if day.name >= first_day]
    return [shard for day in days for shard in _day_shards(day)]


def traffic_models(root: Path) -> list[str]:
    """The models with at least one complete shard under `root`, by name."""
    if not root.is_dir():
        return []
    return [
        folder.name
        for folder in _visible(root)
        if folder.is_dir() and any(_day_shards(day) for day in _days(root, folder.name))
    ]


def newest_sample(root: Path, model: str) -> float | None:
    """When the newest readable sample of `model` was served (None: no readable shard). Reads
    only the newest day folder that holds a readable shard: for messages, not for the check."""
    for day in reversed(_days(root, model)):
        times = []
        for path in _day_shards(day):
            try:
                times.append(float(read_shard(path).times.max()))
            except TrafficError:
                continue
        if times:
            return max(times)
    return None


def day_bytes(root: Path, model: str, seconds: float) -> int:
    """Bytes already written on the UTC day of `seconds` (complete shards and temporaries)."""
    folder = day_folder(root, model, seconds)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def prune(root: Path, model: str, *, keep_days: int, now: float) -> list[Path]:
    """Remove day folders of `model` older than `keep_days` full days before `now`: folders
    named as `day_folder` names them (`YYYY-MM-DD`), nothing else an operator put there."""
    oldest_kept = (_utc(now) - dt.timedelta(days=keep_days)).strftime("%Y-%m-%d")
    removed = [day for day in _days(root, model) if day.name < oldest_kept]
    for day in removed:
        shutil.rmtree(day, ignore_errors=True)
    return removed


def iter_samples(
    root: Path,
    model: str,
    since: float | None = None,
    on_broken: Callable[[Path, TrafficError], None] | None = None,
) -> Iterator[tuple[Path, TrafficShard]]:
    """Each readable shard of `model` with samples at or after `since` (rows filtered). A broken
    shard raises `TrafficError`, or, with `on_broken`, is reported to it and skipped."""
    for path in list_shards(root, model, since):
        try:
            shard = read_shard(path)
        except TrafficError as error:
            if on_broken is None:
                raise
            on_broken(path, error)
            continue
        if since is None:
            yield path, shard
            continue
        keep = shard.times >= since
        if keep.any():
            yield (
                path,
                TrafficShard(
                    model=shard.model,
                    version=shard.version,
                    inputs=shard.inputs[keep],
                    labels=shard.labels[keep],
                    scores=shard.scores[keep],
                    brittle=shard.brittle[keep],
                    times=shard.times[keep],
                ),
            )


Probability = Annotated[float, Field(ge=0, le=1)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Ratio(_Frozen):
    """A fraction of the checked points with its 95 % interval (Wilson score)."""

    value: Probability
    ci_low: Probability
    ci_high: Probability
    count: int = Field(ge=0, description="points counted in the numerator")
    total: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> Ratio:
        if not self.ci_low <= self.value <= self.ci_high:
            raise ValueError(f"{self.value} lies outside [{self.ci_low}, {self.ci_high}]")
        if self.count > self.total:
            raise ValueError(f"count {self.count} exceeds total {self.total}")
        return self


class TrafficCheck(_Frozen):
    """`traffic-check.json`: the flag of one served version, checked on its own traffic.

    Non-robust here is label-free: an attack flips the *served* label within ε. Recall,
    precision and FPR are the flag's against that truth; they are absent when the checked
    points hold no positive (recall) or no flagged point (precision) or no negative (FPR).
    """

    schema_version: Literal[1] = 1
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN, description="the calibration version checked")
    created_at: str
    traffic_since: float = Field(description="unix seconds: the oldest sample considered")
    traffic_until: float = Field(description="unix seconds: the newest sample considered")
    available_points: int = Field(ge=0, description="samples of this version since then")
    seed: int
    threat_model: ThreatModel
    attacks: list[AttackBudget] = Field(min_length=1)
    censored: int = Field(ge=0)
    nonrobust: Ratio
    flagged: Ratio
    recall: Probability | None
    precision: Probability | None
    false_positive_rate: Probability | None
    kendall_tau: float | None
    auroc: float | None
    live_gauge: Probability = Field(
        description="mean g(score) over the checked points: what the live gauge shows for them"
    )
    ratios_agree: bool = Field(description="the non-robust and flagged intervals overlap")
    duration_s: float = Field(ge=0)
    other_version_points: int = Field(
        default=0, ge=0, description="samples since then served by other versions: not checked"
    )
    broken_shards: int = Field(default=0, ge=0, description="unreadable shards, skipped")


def write_atomically(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` by `data` so that a reader sees the old file or the new one, never a part:
    a hidden temporary beside it, fsynced, renamed over it, and the folder fsynced. `mode`: the
    file's exact permissions, set before any byte is written (None: the umask's default)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_traffic_check(version_dir: Path, check: TrafficCheck) -> Path:
    """Publish `check` as `traffic-check.json` in its version's folder, atomically."""
    path = version_dir / TRAFFIC_CHECK_FILE
    write_atomically(path, (check.model_dump_json(indent=2) + "\n").encode())
    return path
