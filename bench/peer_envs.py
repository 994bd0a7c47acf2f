"""The peers' virtual environments for `bench/peers.py`: one per framework, made on first use under
a git-ignored folder (`bench/.peers/<name>/`) with `pip install <framework> onnxruntime==<the
project's> numpy`, so that none of them becomes a dependency of the project. pip resolves first
(`--dry-run`): a framework that would pull in a deep-learning framework or CUDA libraries is not
installed, and the bench reports why, as it does for one that fails to install.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# pip's names of what is too big for a benchmark's side environment (and must not come in): the
# deep-learning frameworks, and CUDA's libraries (nvidia-cublas-cu12, ...; not nvidia-ml-py, the
# small NVML binding BentoML takes)
HEAVY = ("torch", "tensorflow", "jax", "jaxlib")
CUDA = re.compile(r"nvidia-.+-cu\d+")
RECORD = "peer.json"  # the versions installed; its presence means the environment is complete
INSTALL_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str  # what pip installs beside onnxruntime and numpy
    distribution: str  # the package whose version is recorded

    def python(self, root: Path) -> Path:
        return root / self.name / "bin" / "python"


class InstallFailed(Exception):
    """Why a peer's environment could not be made (one line)."""


def project_versions(*distributions: str) -> dict[str, str]:
    """Versions in the interpreter that runs the bench (the project's environment)."""
    return {name: metadata.version(name) for name in distributions}


def ensure(peer: Peer, root: Path, *, reinstall: bool) -> dict[str, str]:
    """The peer's environment, made unless a complete one is there: the installed versions of
    its framework, onnxruntime and numpy. Raises InstallFailed, leaving nothing behind."""
    venv = root / peer.name
    if (venv / RECORD).exists() and not reinstall:
        return dict(json.loads((venv / RECORD).read_text()))
    shutil.rmtree(venv, ignore_errors=True)
    try:
        versions = install(peer, venv)
    except InstallFailed:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    (venv / RECORD).write_text(json.dumps(versions, indent=2))
    return versions


def install(peer: Peer, venv: Path) -> dict[str, str]:
    run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    packages = [peer.requirement, f"onnxruntime=={metadata.version('onnxruntime')}", "numpy"]
    report = run([python, "-m", "pip", "install", "--quiet", "--dry-run", "--report", "-",
                  *packages])  # fmt: skip
    heavy = sorted(heavy_packages(report))
    if heavy:
        raise InstallFailed(f"it pulls in {', '.join(heavy)}")
    run([python, "-m", "pip", "install", "--quiet", *packages])
    script = "import importlib.metadata as m, json, sys; print(json.dumps({d: m.version(d) " \
             "for d in sys.argv[1:]}))"  # fmt: skip
    return dict(json.loads(run([python, "-c", script, peer.distribution, "onnxruntime", "numpy"])))


def heavy_packages(report: str) -> set[str]:
    """The names in a `pip install --dry-run --report` that are too big to come in."""
    names = {item["metadata"]["name"].lower() for item in json.loads(report)["install"]}
    return {name for name in names if name in HEAVY or CUDA.fullmatch(name)}


def run(command: list[str]) -> str:
    """A setup command's standard output; its last line of errors as InstallFailed."""
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise InstallFailed(f"{' '.join(command[:4])} took over {INSTALL_TIMEOUT_S} s") from error
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        raise InstallFailed(errors[-1] if errors else f"exit status {done.returncode}")
    return done.stdout
