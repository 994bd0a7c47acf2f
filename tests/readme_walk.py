"""A reader's walk through the README's blocks, for tests/test_readme.py: a working copy of the
repository, the blocks run in it as written, and the servers they start.

The working copy stands for a fresh clone: the files git knows (tracked, or new and not ignored),
copied into a temporary folder, with `.venv` a folder of links to the project's venv and its
own `.installed` marker (so that `make` finds the install done, as after a first `make serve`).
The blocks run there with `.venv/bin` first on PATH, as after `. .venv/bin/activate`, and with
`MARGINWATCH_STORE` pointing at the copy's `artifacts/`: the editable install's default store is
the checkout's own, which no README block may write to. The example ports are replaced by free
ones: 8000 and 8080 by the API port, 8001 by the gRPC port, 9090 by the metrics port.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from ports import free_port
from readme_blocks import Block

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PORTS = {"8000": "api", "8080": "api", "8001": "grpc", "9090": "metrics"}
PORT = re.compile(r"(?<![\d.])(8000|8080|8001|9090)(?!\d)")
# A block that starts a long-running server: it runs in the background until the next one.
SERVER = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:make serve\b|marginwatch-serve\b(?!.*--help))", re.M)
TALKS_TO_SERVER = re.compile(r"localhost:\d+|127\.0\.0\.1:\d+")
TIMEOUT_S = 600


def copy_checkout(target: Path) -> None:
    """The files git knows, copied with their times (links kept as links), and the venv linked."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name, follow_symlinks=False)
    venv = target / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():  # the venv running the tests (the Makefile's .venv)
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()  # newer than the copied pyproject.toml


@dataclass
class Walk:
    """The working copy, its environment and ports, the running server, the blocks run."""

    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    server: subprocess.Popen[bytes] | None = None
    server_block: Block | None = None
    done: dict[tuple[str, int], str] = field(default_factory=dict)  # block → its stdout

    def __post_init__(self) -> None:
        self.ports = {kind: free_port() for kind in ("api", "grpc", "metrics")}

    @property
    def env(self) -> dict[str, str]:
        # a new user's shell: none of our settings, and not inside the `make test` that may be
        # running this (its MAKEFLAGS/MAKELEVEL make a nested make print "Entering directory")
        outside = ("MARGINWATCH_", "MAKE", "MFLAGS")
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(outside)}
        venv_bin = self.root / ".venv" / "bin"
        return {
            **inherited,
            "PATH": f"{venv_bin}{os.pathsep}{inherited.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.root / ".venv"),
            "MARGINWATCH_STORE": str(self.root / "artifacts"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def with_ports(self, text: str) -> str:
        return PORT.sub(lambda found: str(self.ports[EXAMPLE_PORTS[found.group(1)]]), text)

    def run(self, block: Block, text: str | None = None, **env: str) -> str:
        """Run a command block (or `text` in its place) in the copy; its standard output."""
        source = self.with_ports(block.text if text is None else text)
        command = ["bash", "-euo", "pipefail", "-c", source]
        if block.language == "python":
            command = [sys.executable, "-c", source]
        result = subprocess.run(
            command, cwd=self.root, env={**self.env, **env}, capture_output=True, text=True,
            timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(
                f"{block.label} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def start_server(self, block: Block, **env: str) -> None:
        """A server block in the background (after stopping the running one), until ready.
        `make serve` without PORT= takes its port from the environment (`PORT ?= 8000`)."""
        self.stop_server()
        env = {"PORT": str(self.ports["api"]), **env}
        log = self.root / f"server-{block.line}.log"
        with log.open("wb") as sink:
            self.server = subprocess.Popen(
                ["bash", "-c", self.with_ports(block.text)], cwd=self.root,
                env={**self.env, **env}, stdout=sink, stderr=sink, start_new_session=True,
            )  # fmt: skip
        self.server_block = block
        url = f"http://127.0.0.1:{self.ports['api']}/v2/health/ready"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"{block.label} exited:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{block.label}: not ready after 120 s:\n{log.read_text()}")

    def stop_server(self) -> None:
        """SIGTERM to the server's process group (`make` and the server it runs), then wait."""
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(10)
        self.server = None
        self.server_block = None


def is_server(block: Block) -> bool:
    return block.language == "sh" and SERVER.search(block.text) is not None


def prerequisites(block: Block, blocks: list[Block]) -> list[Block]:
    """The blocks a reader runs before `block`: the commands before it in its section, and, for
    a block that talks to a server with none started before it in its section, the nearest
    server block above it (with its own prerequisites). Text blocks are checked on their own."""
    if not block.is_command:
        return []
    above = blocks[: blocks.index(block)]
    same = [b for b in above if b.is_command and b.section == block.section]
    if TALKS_TO_SERVER.search(block.text) and not any(map(is_server, same)):
        servers = [b for b in above if is_server(b)]
        if servers:
            return [*prerequisites(servers[-1], blocks), servers[-1], *same]
    return same
