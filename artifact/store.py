"""The artifact store: `<store>/<model>/<version>/{model.onnx, calibration.json, report.html}`
and a `<store>/<model>/CURRENT` pointer that moves only after a version is complete and verified.

Crash safety comes from the file system's atomic rename: a version is built in a hidden staging
folder, fsynced, verified, renamed into place, and only then does CURRENT change, by writing a
temporary file and renaming it over the old pointer. A run killed at any moment therefore leaves
either the old CURRENT or the new one, never a half-written version behind it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import ValidationError

from marginwatch.artifact.hashing import file_sha256
from marginwatch.artifact.schema import ONNX_FILE, RECORD_FILE, CalibrationRecord

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
STORE_ENV = "MARGINWATCH_STORE"
DEFAULT_STORE = Path(__file__).resolve().parent.parent / "artifacts"


class ArtifactError(Exception):
    """A version that is missing, incomplete, or fails its hash or schema check."""


class PublishIncomplete(ArtifactError):
    """The version folder is in the store but CURRENT could not be moved to it: the store
    changed (one more version), the served version did not."""


def reserved_version_problem(version: str) -> str | None:
    """Why `version` cannot name a version folder, or None: the store's own names
    (`CURRENT`, in any case, for case-insensitive file systems) would be shadowed by it."""
    if version.upper() == CURRENT_FILE:
        return f"version {version!r} is the store's pointer file's name ({CURRENT_FILE})"
    return None


class StoreBusy(Exception):
    """Another calibration of the same model holds the store's lock."""


def default_store() -> Path:
    from_env = os.environ.get(STORE_ENV)
    return Path(from_env) if from_env else DEFAULT_STORE


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(folder)


def read_record(version_dir: Path) -> CalibrationRecord:
    """Load and verify one version: schema valid, and `model.onnx` matches its recorded hash."""
    record_path = version_dir / RECORD_FILE
    onnx_path = version_dir / ONNX_FILE
    if not record_path.exists() or not onnx_path.exists():
        raise ArtifactError(f"{version_dir} is incomplete: needs {RECORD_FILE} and {ONNX_FILE}")
    try:
        record = CalibrationRecord.model_validate_json(record_path.read_bytes())
    except ValidationError as error:
        raise ArtifactError(f"{record_path} does not match the schema: {error}") from error
    actual = file_sha256(onnx_path)
    if actual != record.model_sha256:
        raise ArtifactError(
            f"{onnx_path} has sha256 {actual[:12]}…, but {RECORD_FILE} records "
            f"{record.model_sha256[:12]}…: refusing a model that is not the calibrated one"
        )
    return record


def current_version(store: Path, model: str) -> str | None:
    pointer = store / model / CURRENT_FILE
    if not pointer.exists():
        return None
    return pointer.read_text().strip() or None


def current_dir(store: Path, model: str) -> Path:
    version = current_version(store, model)
    if version is None:
        raise ArtifactError(f"no calibrated version of {model!r} in {store} (no CURRENT pointer)")
    return store / model / version


def list_models(store: Path) -> list[str]:
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if (p / CURRENT_FILE).exists())


@contextlib.contextmanager
def model_lock(store: Path, model: str) -> Iterator[None]:
    """Exclusive, non-blocking: a second run of the same model fails fast with `StoreBusy`.
    The kernel drops the lock when the holder dies, so a killed run never wedges the store."""
    folder = store / model
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise StoreBusy(f"another calibration of {model!r} is running in {store}") from error
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def new_version_id(store: Path, model: str, *, clock: Callable[[], float] = time.time) -> str:
    """A version id that is free in `store` and sorts after the ids this clock gave before:
    UTC time to the millisecond (`20261207T044737.123Z`), and where two runs still land on one
    millisecond (a coarse or fixed clock), a counter after it (`...Z-002`). Called under the
    model's lock, so concurrent runs cannot pick the same id."""
    seconds = clock()
    whole = int(seconds)
    millis = min(round((seconds - whole) * 1000), 999)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole)) + f".{millis:03d}Z"
    folder = store / model
    candidate, counter = stamp, 1
    while (folder / candidate).exists() or (folder / f"{STAGING_PREFIX}{candidate}").exists():
        counter += 1
        candidate = f"{stamp}-{counter:03d}"
    return candidate


def new_staging_dir(store: Path, model: str, version: str) -> Path:
    """A fresh staging folder; leftovers of killed runs are removed first (we hold the lock)."""
    folder = store / model
    for leftover in folder.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = folder / f"{STAGING_PREFIX}{version}"
    staging.mkdir(parents=True)
    return staging


def write_record(staging: Path, record: CalibrationRecord) -> None:
    (staging / RECORD_FILE).write_text(json.dumps(record.model_dump(mode="json"), indent=2) + "\n")


def publish(store: Path, model: str, staging: Path) -> Path:
    """Verify `staging`, move it into place as its version, then switch CURRENT to it."""
    record = read_record(staging)
    if record.model_name != model:
        raise ArtifactError(f"staged record names model {record.model_name!r}, not {model!r}")
    problem = reserved_version_problem(record.version)
    if problem is not None:
        raise ArtifactError(problem)
    _fsync_tree(staging)
    final = store / model / record.version
    if final.exists():
        raise ArtifactError(f"version {record.version} of {model!r} already exists")
    _unwedge_pointer(store / model)
    staging.rename(final)
    fsync_dir(final.parent)
    try:
        read_record(final)
        _write_pointer(store / model, record.version)
    except (OSError, ArtifactError) as error:
        raise PublishIncomplete(
            f"version {record.version} was added to {store / model} but {CURRENT_FILE} could "
            f"not be moved to it ({error}); the served version is unchanged"
        ) from error
    return final


def _write_pointer(folder: Path, version: str) -> None:
    pointer_tmp = folder / f".{CURRENT_FILE}.tmp"
    with pointer_tmp.open("w") as handle:
        handle.write(version + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    pointer_tmp.replace(folder / CURRENT_FILE)
    fsync_dir(folder)


def _unwedge_pointer(folder: Path) -> None:
    """A folder named CURRENT (a version published under that name by an older release) makes
    the pointer unwritable and the model unservable: move it aside, hidden, kept for a person
    to look at, so that this publish repairs the store."""
    pointer = folder / CURRENT_FILE
    if pointer.is_dir() and not pointer.is_symlink():
        aside = folder / f".{CURRENT_FILE}-folder-{new_version_id(folder.parent, folder.name)}"
        pointer.rename(aside)
        fsync_dir(folder)
