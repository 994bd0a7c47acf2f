"""A server of `bench/peers.py` as a process: started in a session of its own with its output in a
log file, asked whether it answers correctly, and stopped with everything it started.

Stopping: SIGTERM to the server's process group, up to `STOP_WAIT_S` for it to exit, then
SIGKILL to every process still in its session. The session, not the group, because frameworks
start processes that lead groups of their own (Ray's actors) and that outlive their parent; all
of them keep the session of the server, which bench/peers.py started, and are found by its id
while the server, dead or alive, is not yet reaped (so that the id cannot have been reused).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

STOP_WAIT_S = 30.0
Expected = tuple[list[int], list[bool]]  # labels and flags


class ServerFailed(Exception):
    """Why a server could not be measured (one line)."""


@contextlib.contextmanager
def serving(
    command: list[str], env: dict[str, str], log: Path, *, cwd: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while not exited(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in session(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + STOP_WAIT_S  # SIGKILL is not instant: free the cores and ports
    while time.monotonic() < deadline and any(
        state(pid) not in ("Z", None) for pid in session(process.pid)
    ):
        time.sleep(0.1)


def exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its id stays ours)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def session(leader: int) -> list[int]:
    """The processes whose session is `leader`'s, the leader included."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == leader:
                    members.append(int(entry.name))
    return members


def state(pid: int) -> str | None:
    """A process's state letter (Z: a zombie), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def post(port: int, path: str, body: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_answering(
    port: int, path: str, body: bytes, process: subprocess.Popen[bytes], *, timeout_s: float,
    log: Path,
) -> None:  # fmt: skip
    """Until the server answers `body` with 200 (frameworks listen before their model is in)."""
    deadline = time.monotonic() + timeout_s
    last = "nothing"
    while time.monotonic() < deadline:
        if exited(process.pid):
            raise ServerFailed(f"it exited at start-up: {last_line(log)}")
        try:
            status, content = post(port, path, body, timeout_s=10.0)
        except OSError as error:
            last = str(error)
        else:
            if status == 200:
                return
            last = f"status {status}: {content[:200]!r}"
        time.sleep(0.5)
    raise ServerFailed(f"no answer in {timeout_s:.0f} s (last: {last})")


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "(no output)"


def answer(content: bytes, threshold: float) -> Expected:
    """Labels and flags from an OIP v2 JSON response: the `brittle` output, else the `score`
    output against λ (the minimal endpoint answers its score)."""
    outputs = {output["name"]: output["data"] for output in json.loads(content)["outputs"]}
    flags = (
        outputs["brittle"] if "brittle" in outputs else [s < threshold for s in outputs["score"]]
    )
    return [int(label) for label in outputs["label"]], [bool(flag) for flag in flags]


def check(port: int, path: str, checks: list[tuple[bytes, Expected]], *, threshold: float) -> None:
    """Every check body answered with the labels and flags of ONNX Runtime run directly."""
    for body, expected in checks:
        status, content = post(port, path, body)
        if status != 200:
            raise ServerFailed(f"status {status} for a check body: {content[:200]!r}")
        try:
            got = answer(content, threshold)
        except (ValueError, KeyError, TypeError) as error:
            raise ServerFailed(f"unreadable answer {content[:200]!r}") from error
        if got != expected:
            raise ServerFailed(f"answered (labels, flags) {got}, ONNX Runtime gives {expected}")
