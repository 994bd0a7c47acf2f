"""Served models by name, hot reload, and readiness.

Each loaded version is a `Deployment` (`deployment.py`): a `ServedModel` and its own
`MicroBatcher`. A request looks its deployment up and submits to it without awaiting in between,
so it finishes on the version it started with. The watcher polls every model's CURRENT pointer;
a new version is loaded and verified beside the old one (in a thread, so serving goes on), then
swapped in with one dict assignment; the old deployment's batcher serves what it has queued and
stops.

A version that fails verification, and a CURRENT that cannot be read (not UTF-8, a permission),
is refused with a log line and a `marginwatch_reloads_total{result="failure"}` increment, and the
old version keeps serving. A refused version is tried again at the first poll after CURRENT, the
version folder or one of its files changes (compared by `stat`: cheap enough for every poll),
else after a backoff that doubles from `reload_retry_min_s` up to `reload_retry_max_s`: a fault
that heals by itself (a file copied late, a storage hiccup) needs no one to touch the store, and a
replica that keeps running does not drift from one started later.

Readiness: with `MARGINWATCH_MODELS` set, the process is ready when every model named there is
served. Otherwise models are discovered in the store at every poll and the process is ready when
at least one is served: a model stops being served only when its folder leaves the store (a
refused reload keeps the old version), and then it is forgotten (its deployment drained, its
metrics series dropped), not lost. So a bad model costs its own readiness only
(`/v2/models/{name}/ready`, `marginwatch_model_ready`), and nothing once its folder is removed.

Each poll also looks at the served version's `traffic-check.json` (written later, by the
calibration job's check of the flag on sampled traffic) by `stat`, and reads it only when it
changed: the model is not reloaded, its metrics (`TrafficChecks`) change. One that cannot be read,
does not validate or checks another version is logged once, counted and shown as no check.
Every executed batch is offered to the traffic sampler, when sampling is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from marginwatch.artifact.schema import ONNX_FILE, RECORD_FILE
from marginwatch.artifact.store import CURRENT_FILE, ArtifactError, current_version, list_models
from marginwatch.artifact.traffic import TRAFFIC_CHECK_FILE, TrafficCheck
from marginwatch.service.deployment import Deployment, deploy
from marginwatch.service.engine import EngineOptions, ServedModel
from marginwatch.service.errors import ModelNotFound, ModelNotReady
from marginwatch.service.metrics import ServiceMetrics
from marginwatch.service.settings import Settings
from marginwatch.service.state_metrics import ModelState
from marginwatch.service.traffic_sampler import TrafficSampler

logger = logging.getLogger("marginwatch.service")

# What a load attempt read, as (inode, size, ctime, mtime) of each file: a fix written in place
# changes a file's times (a chmod its ctime), a rename its inode, a file that appears all four.
Stamp = tuple[int, ...]
# What a load may raise: the artifact checks, the file system, a CURRENT that is not UTF-8 text.
LOAD_ERRORS = (ArtifactError, OSError, ValueError)


@dataclass(frozen=True)
class Refusal:
    """A model's last refused load: of which version, its files then, when to try it again."""

    version: str | None  # None: CURRENT itself could not be read
    stamp: Stamp
    attempts: int  # refusals in a row of these very files
    retry_at: float  # time.monotonic()

    def of(self, version: str | None, seen: Stamp) -> bool:
        """Whether this refusal was of `version` with its files as `seen` now."""
        return (self.version, self.stamp) == (version, seen)


def retry_delay_s(attempts: int, *, first_s: float, most_s: float) -> float:
    """The wait after `attempts` refusals of unchanged files: `first_s`, doubled each time, at
    most `most_s`."""
    return min(most_s, first_s * 2.0 ** min(attempts - 1, 64))  # capped: 2**huge overflows


def stamp_of(paths: list[Path]) -> Stamp:
    """The identity of `paths` for change detection; one that cannot be stat'ed counts as
    zeros, so its appearing later is a change."""
    values: list[int] = []
    for path in paths:
        try:
            status = path.stat()
        except (OSError, ValueError):  # missing, unreadable, or a name the OS refuses (NUL)
            values += (0, 0, 0, 0)
        else:
            values += (status.st_ino, status.st_size, status.st_ctime_ns, status.st_mtime_ns)
    return tuple(values)


def version_files(folder: Path) -> list[Path]:
    return [folder, folder / RECORD_FILE, folder / ONNX_FILE]


class ModelRegistry:
    """The models this process serves; `start()` loads them, `stop()` drains them."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        sampler: TrafficSampler | None = None,
        backlog: Callable[[], bool] = lambda: False,
    ) -> None:
        self._settings = settings
        self._backlog = backlog  # whether requests wait for admission (each batcher's hint)
        self._metrics = metrics
        self._sampler = sampler
        self._options = EngineOptions(
            device=settings.device,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
        )
        self._known: set[str] = set(settings.models)
        self._serving: dict[str, Deployment] = {}
        self._desired: dict[str, str | None] = {}
        self._refusals: dict[str, Refusal] = {}
        self._checks_seen: dict[str, tuple[str, Stamp]] = {}  # version and traffic-check stamp
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._store_problem: str | None = None  # why the last poll could not list the store
        for name in self._known:
            metrics.track(name)
        metrics.models.watch(self.states)

    def known(self, name: str) -> bool:
        return name in self._known

    def names(self) -> list[str]:
        return sorted(self._known)

    def ready(self) -> bool:
        """Every configured model is served; without a configured list, at least one model is
        (see the module's docstring for why none that was served can be lost)."""
        if self._settings.models:
            return all(name in self._serving for name in self._settings.models)
        return bool(self._serving)

    def states(self) -> list[ModelState]:
        """Each known model's desired and served version (for the metrics, read at scrape)."""
        return [
            ModelState(name, self._desired.get(name), self._served_version(name))
            for name in sorted(self._known)
        ]

    def get(self, name: str) -> Deployment:
        deployment = self._serving.get(name)
        if deployment is not None:
            return deployment
        if name not in self._known:
            raise ModelNotFound(f"no model named {name!r}; served models: {self.names()}")
        refusal = self._refusals.get(name)
        refused = f" ({_what(refusal.version)} was refused)" if refusal else ""
        raise ModelNotReady(f"model {name!r} has no verified calibration version loaded{refused}")

    async def start(self) -> None:
        await self.refresh()
        if self._settings.reload_interval_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="reload")

    async def stop(self) -> None:
        """Stop watching, then let every batcher serve what it has queued."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        deployments = list(self._serving.values())
        self._serving.clear()
        await asyncio.gather(*(d.batcher.close() for d in deployments), *self._retiring)

    async def refresh(self) -> None:
        """One poll: find the models (when none are configured), then bring each to the version
        its CURRENT names, unless that version was refused and is not due for another try."""
        if not self._settings.models:
            self._discover()
        elif self._settings.store.is_dir():
            self._store_available()
        else:  # models named in the settings are looked up one by one; the store itself is gone
            self._store_unavailable(f"the artifact store {self._settings.store} is missing")
        for name in sorted(self._known):
            try:
                await self._refresh_one(name)
                await self._refresh_check(name)
            except Exception:  # a bug in one model's refresh must not stop the others' reloads
                logger.exception("refreshing %s failed", name)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._settings.reload_interval_s)
            try:
                await self.refresh()
            except Exception:  # a broken poll must not end the watcher
                logger.exception("polling the artifact store failed")

    def _discover(self) -> None:
        """Known: every model with a CURRENT, and a served one while its folder exists (with no
        CURRENT it keeps its verified version). A model no longer known is forgotten."""
        store = self._settings.store
        try:
            listed = set(list_models(store)) if store.is_dir() else None
        except OSError as error:
            listed, problem = None, f"cannot be listed ({error})"
        else:
            problem = "is missing" if listed is None else "lists no model"
        # An unmounted (or freshly remounted, still empty) volume is not every model deleted:
        # forget nothing, keep serving what is loaded, and say so.
        if listed is None or (not listed and self._serving):
            self._store_unavailable(f"the artifact store {store} {problem}")
            return
        self._store_available()
        names = listed | {name for name in self._serving if (store / name).is_dir()}
        for name in self._known - names:
            self._forget(name)
        for name in names - self._known:
            self._metrics.track(name)
        self._known = names

    def _store_unavailable(self, problem: str) -> None:
        if self._store_problem != problem:  # logged once per change, not on every poll
            logger.warning(
                "%s; still serving %s", problem, ", ".join(sorted(self._serving)) or "nothing"
            )
        self._store_problem = problem
        self._metrics.store_available.set(0)

    def _store_available(self) -> None:
        if self._store_problem is not None:
            logger.info("the artifact store %s lists models again", self._settings.store)
        self._store_problem = None
        self._metrics.store_available.set(1)

    async def _refresh_one(self, name: str) -> None:
        folder = self._settings.store / name
        seen = stamp_of([folder / CURRENT_FILE])  # before reading: a later change shows next poll
        try:
            version = current_version(self._settings.store, name)
        except LOAD_ERRORS as error:
            self._desired[name] = None
            if self._due(name, None, seen):
                self._refuse(name, None, seen, f"cannot read {CURRENT_FILE}: {error}")
            return
        self._desired[name] = version
        if version is None or version == self._served_version(name):
            self._refusals.pop(name, None)  # nothing to load: an old refusal no longer matters
            return
        seen += stamp_of(version_files(folder / version))
        if not self._due(name, version, seen):
            return
        model = ServedModel(name, folder / version, self._options)
        try:
            await asyncio.to_thread(model.load)
        except LOAD_ERRORS as error:
            self._refuse(name, version, seen, str(error))
            return
        self._refusals.pop(name, None)
        self._serve(model)

    async def _refresh_check(self, name: str) -> None:
        """Show the served version's traffic check, re-read only when its file changed."""
        deployment = self._serving.get(name)
        if deployment is None:
            self._checks_seen.pop(name, None)
            self._metrics.observe_traffic_check(name, None)
            return
        model = deployment.model
        path = model.version_dir / TRAFFIC_CHECK_FILE
        seen = (model.version, stamp_of([path]))
        if self._checks_seen.get(name) == seen:
            return
        self._checks_seen[name] = seen
        check = None
        if any(seen[1]):  # all zeros: no file (yet)
            try:
                check = await asyncio.to_thread(read_traffic_check, path, name, model.version)
            except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
                self._metrics.observe_traffic_check_error(name)
                logger.warning("ignored %s: %s", path, error)
            else:
                logger.info("traffic check of %s version %s: recall %s, ratios agree: %s",
                            name, model.version, check.recall, check.ratios_agree)  # fmt: skip
        self._metrics.observe_traffic_check(name, check)

    def _due(self, name: str, version: str | None, seen: Stamp) -> bool:
        """Whether to try `version`: it was not refused, its files changed, or its backoff ended."""
        refusal = self._refusals.get(name)
        return (
            refusal is None or not refusal.of(version, seen) or time.monotonic() >= refusal.retry_at
        )

    def _refuse(self, name: str, version: str | None, seen: Stamp, reason: str) -> None:
        previous = self._refusals.get(name)
        attempts = (
            previous.attempts + 1 if previous is not None and previous.of(version, seen) else 1
        )
        delay_s = retry_delay_s(
            attempts,
            first_s=self._settings.reload_retry_min_s,
            most_s=self._settings.reload_retry_max_s,
        )
        self._refusals[name] = Refusal(version, seen, attempts, time.monotonic() + delay_s)
        self._metrics.observe_refusal(name)
        logger.error(
            "refused %s %s (still serving %s): %s; next try in %g s, or at the first poll after "
            "its files change",
            name, _what(version), self._served_version(name) or "none", reason, delay_s,
        )  # fmt: skip

    def _serve(self, model: ServedModel) -> None:
        old = self._serving.get(model.name)
        self._serving[model.name] = self._deploy(model)
        self._metrics.observe_version(model.name, model.record)
        logger.info(
            "serving %s version %s (was %s)",
            model.name, model.version, old.model.version if old else "none",
        )  # fmt: skip
        if old is not None:
            self._retire(old)

    def _forget(self, name: str) -> None:
        """`name` left the store: stop serving it, drop what is known of it and its series."""
        self._known.discard(name)
        self._desired.pop(name, None)
        self._refusals.pop(name, None)
        self._checks_seen.pop(name, None)
        self._metrics.forget(name)
        deployment = self._serving.pop(name, None)
        served = f" (was serving {deployment.model.version})" if deployment else ""
        logger.warning("forgot %s: its folder left the store%s", name, served)
        if deployment is not None:
            self._retire(deployment)

    def _retire(self, deployment: Deployment) -> None:
        """Let the batcher serve what it has queued, in the background. The last batches record
        metrics: for a model forgotten meanwhile, those series are dropped once they are done."""

        async def retire() -> None:
            await deployment.batcher.close()
            if deployment.model.name not in self._known:
                self._metrics.forget(deployment.model.name)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _served_version(self, name: str) -> str | None:
        deployment = self._serving.get(name)
        return deployment.model.version if deployment is not None else None

    def _deploy(self, model: ServedModel) -> Deployment:
        return deploy(model, self._settings, self._metrics, self._sampler, self._backlog)


def read_traffic_check(path: Path, model: str, version: str) -> TrafficCheck:
    """The check in `path`, which must be of `model` at `version`; `ValueError` otherwise."""
    check = TrafficCheck.model_validate_json(path.read_bytes())
    if (check.model_name, check.version) != (model, version):
        raise ValueError(
            f"it checks {check.model_name!r} version {check.version!r}, not {model!r} version "
            f"{version!r}"
        )
    return check


def _what(version: str | None) -> str:
    """How a log line names what was refused."""
    return f"version {version}" if version is not None else f"{CURRENT_FILE} pointer"
