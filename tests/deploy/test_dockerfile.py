"""The Dockerfile's promises, checked without a Docker engine (none runs here).

- hadolint passes, every finding counted (.hadolint.yaml), and every rule ignored is explained.
- Every base image is pinned by digest (`<image>:<tag>@sha256:<64 hex>`), and
  deploy/images/refresh-digests.sh rewrites exactly those pins: it runs on a copy of the
  Dockerfile with a stand-in `crane` that answers one digest, because no registry is reachable
  from here.
- Each image's lock (deploy/images/*.lock.txt) pins every package with == and sha256 hashes,
  holds every requirement of pyproject.toml that the image installs at a version that satisfies
  it, and holds no torchvision; the serving locks hold no torch.
- The serve image's build steps, read from the Dockerfile, run outside a container: stages
  `build-cpu` and `serve`, with the image's paths (/opt, /src) moved under a temporary folder,
  COPY honouring .dockerignore (a lock or a package the COPY lines miss fails the build), and
  this CPython 3.11 standing for the `python:3.11` base. The venv that comes out then runs the
  image's CMD (on 127.0.0.1 and a free port instead of 0.0.0.0:8000), answers the HEALTHCHECK's
  request, and serves the baked-in store (ready).

  Skipped, and why: FROM (this interpreter stands for the image); `RUN useradd`, `--chown` and
  USER (they need root and would add a user to this machine); PIP_NO_CACHE_DIR (the image keeps
  no pip cache; here pip's cache keeps the test short, and the lock's hashes check every byte
  installed). pip takes the packages from wherever this machine's pip configuration points, as
  `make`'s own installs do. Not run at all: the `calibrate` and `serve-gpu` targets, whose
  apt-get lines need root and the image's own distribution, whose torch (190 MB) or
  onnxruntime-gpu (several hundred MB) would not fit the test's time, and whose serve-gpu Python
  is Ubuntu's 3.12; their locks are checked as above.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
IMAGES = ROOT / "deploy" / "images"
LOCK_SCRIPT = IMAGES / "lock.sh"
PINNED_IMAGE = re.compile(r"^[a-z0-9./_-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")
# The image's own absolute paths, moved under the test's folder; any other absolute path in a
# RUN line that the test runs fails the test rather than touch this machine.
IMAGE_PATHS = re.compile(r"(?<![\w.$/-])/(opt|src)(?=[/\s:]|$)")
# RUN lines of the serve stages that the test does not run, and ENV it does not set, with why.
NOT_RUN = {"useradd": "needs root, and would add a user to this machine"}
NOT_SET = {"PIP_NO_CACHE_DIR": "the image keeps no cache; here the cache keeps the test short"}


# --- the Dockerfile, read ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, tuple[str, list[Instruction]]]  # name -> (FROM image, instructions)


def instructions(text: str) -> list[Instruction]:
    """Continued lines joined; comments dropped, inside a continued instruction too (as Docker
    does)."""
    found: list[Instruction] = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        found.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    return found


def parse_dockerfile(text: str) -> Dockerfile:
    parsed = Dockerfile({}, {})
    current: list[Instruction] | None = None
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            image, _, name = instruction.arguments.partition(" AS ")
            current = []
            parsed.stages[name.strip()] = (image.strip(), current)
        elif current is None:
            assert instruction.keyword == "ARG", f"line {instruction.line}: before any FROM"
            name, _, value = instruction.arguments.partition("=")
            parsed.global_args[name] = value
        else:
            current.append(instruction)
    return parsed


def expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` as Docker substitutes them in ENV, COPY and WORKDIR."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


# --- .dockerignore -----------------------------------------------------------------------------


def dockerignore(text: str) -> Callable[[str], bool]:
    """Whether the build context leaves a path (relative, with /) out: the last pattern that
    matches the path or one of its parent folders decides; `!` takes a path back in."""
    rules = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else
            re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", pattern)
        )  # fmt: skip
        rules.append((negate, re.compile(regex)))

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
        verdict = False
        for negate, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                verdict = not negate
        return verdict

    return ignored


IGNORED = dockerignore((ROOT / ".dockerignore").read_text())


def test_dockerignore_reading() -> None:
    """The reading above agrees with Docker's on the patterns the file uses."""
    rules = dockerignore("deploy\n!deploy/images/*.lock.txt\n**/__pycache__\nartifacts/**/.lock")
    assert rules("deploy/README.md") and rules("deploy/images/lock.sh")
    assert not rules("deploy/images/serve.lock.txt")
    assert rules("service/__pycache__/app.cpython-311.pyc")
    assert rules("artifacts/m/.lock") and not rules("artifacts/m/CURRENT")


# --- hadolint and the base images ----------------------------------------------------------------


def test_hadolint_passes(hadolint: str) -> None:
    result = subprocess.run(
        [hadolint, "--config", ".hadolint.yaml", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_ignored_rule_is_explained() -> None:
    config_text = (ROOT / ".hadolint.yaml").read_text()
    config = yaml.safe_load(config_text)
    assert config["failure-threshold"] == "info"  # style and info findings fail too
    comments = "\n".join(line for line in config_text.splitlines() if line.startswith("#"))
    for rule in config.get("ignored", []):
        assert rule in comments, f".hadolint.yaml ignores {rule} without saying why"
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [n for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert pragmas, "the apt-get lines carry DL3008's inline ignore"
    for number in pragmas:
        above = number
        while above > 0 and lines[above - 1].startswith("#"):
            above -= 1
        reason = "\n".join(lines[above:number])  # the comment right above the pragma
        for rule in lines[number].removeprefix("# hadolint ignore=").split(","):
            assert rule in reason, f"Dockerfile line {number + 1}: {rule} ignored without a why"


def test_base_images_are_pinned_by_digest(dockerfile: Dockerfile) -> None:
    names = set()
    for name, (image, _) in dockerfile.stages.items():
        names.add(name)
        if image in names:
            continue  # an earlier stage
        resolved = expand(image, dockerfile.global_args)
        assert PINNED_IMAGE.match(resolved), f"stage {name}: {resolved} is not tag@sha256:digest"
    assert set(dockerfile.global_args) == {"PYTHON_IMAGE", "CUDA_IMAGE"}


def test_refresh_script_rewrites_the_pins(tmp_path: Path, dockerfile: Dockerfile) -> None:
    """With a stand-in `crane` (no registry is reachable here) that answers one digest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    new = "sha256:" + "ab" * 32
    (bin_dir / "crane").write_text(f'#!/bin/sh\n[ "$1" = digest ] && echo {new}\n')
    (bin_dir / "crane").chmod(0o755)
    copy = tmp_path / "Dockerfile"
    copy.write_text(DOCKERFILE.read_text())
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(IMAGES / "refresh-digests.sh"), str(copy)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rewritten = parse_dockerfile(copy.read_text()).global_args
    for name, value in dockerfile.global_args.items():
        assert rewritten[name] == value.split("@")[0] + "@" + new
    old_lines = DOCKERFILE.read_text().splitlines()
    changed = [a for a, b in zip(old_lines, copy.read_text().splitlines(), strict=True) if a != b]
    assert len(changed) == len(dockerfile.global_args)  # the pins, nothing else


# --- the locks -----------------------------------------------------------------------------------


@dataclass
class LockPlan:
    """One `compile` line of lock.sh: the lock, its Python, its extras and its extra inputs."""

    lock: str
    python: str
    extras: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


def lock_plans() -> dict[str, LockPlan]:
    text = LOCK_SCRIPT.read_text().replace("\\\n", " ")
    plans = {}
    for lock, python, rest in re.findall(
        r"^\s*compile (\S+\.lock\.txt) ([\d.]+) (.*)$", text, re.M
    ):
        words = shlex.split(rest)
        plan = LockPlan(lock, python, inputs=[w for w in words if w.endswith(".in")])
        plan.extras = [words[i + 1] for i, word in enumerate(words) if word == "--extra"]
        plans[lock] = plan
    return plans


def read_lock(path: Path) -> dict[str, Version]:
    """name -> pinned version; fails on a line that is not `name==version` with its hashes."""
    pins = {}
    text = path.read_text()
    assert text.startswith("# This file was autogenerated by uv"), f"{path.name}: not uv's"
    logical = [line for line in text.replace("\\\n", " ").splitlines() if line.strip()]
    for line in logical:
        if line.lstrip().startswith("#"):
            continue
        name_version, *options = line.split()
        name, equals, version = name_version.partition("==")
        assert equals and options, f"{path.name}: {name_version} is not pinned with hashes"
        assert all(HASH.match(option) for option in options), f"{path.name}: {name_version}"
        pins[str(canonicalize_name(name))] = Version(version)
    return pins


def wanted(plan: LockPlan) -> list[Requirement]:
    """What the image installs from pyproject.toml and the plan's inputs, for its Python."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    texts = list(pyproject["project"]["dependencies"])
    texts += pyproject["build-system"]["requires"]
    for extra in plan.extras:
        texts += pyproject["project"]["optional-dependencies"][extra]
    for name in ["deploy/images/build.in", *plan.inputs]:
        lines = (ROOT / name).read_text().splitlines()
        texts += [line for line in lines if line.strip() and not line.startswith("#")]
    environment = {"python_version": plan.python, "python_full_version": f"{plan.python}.0",
                   "sys_platform": "linux", "platform_system": "Linux",
                   "platform_machine": "x86_64", "extra": ""}  # fmt: skip
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(environment)]


def test_every_lock_is_planned_and_used(dockerfile: Dockerfile) -> None:
    plans = lock_plans()
    assert set(plans) == {path.name for path in IMAGES.glob("*.lock.txt")}
    assert set(plans) == {
        "serve.lock.txt", "serve-gpu.lock.txt", "calibrate.lock.txt", "calibrate-gpu.lock.txt",
    }  # fmt: skip
    text = DOCKERFILE.read_text()
    for lock in plans:
        assert f"deploy/images/{lock}" in text, f"the Dockerfile never names {lock}"
        assert not IGNORED(f"deploy/images/{lock}"), f".dockerignore leaves {lock} out"
    python_tag = re.search(r"python:(\d+\.\d+)", dockerfile.global_args["PYTHON_IMAGE"])
    assert python_tag is not None
    for lock in ("serve.lock.txt", "calibrate.lock.txt", "calibrate-gpu.lock.txt"):
        assert plans[lock].python == python_tag.group(1), f"{lock}: not the base image's Python"
    assert plans["serve-gpu.lock.txt"].python == "3.12"  # Ubuntu 24.04's python3


@pytest.mark.parametrize("lock", sorted(lock_plans()))
def test_lock_holds_pyproject_requirements(lock: str) -> None:
    """In step with pyproject.toml: after a change there, `make lock` (deploy/images/lock.sh)."""
    pins = read_lock(IMAGES / lock)
    for requirement in wanted(lock_plans()[lock]):
        name = str(canonicalize_name(requirement.name))
        assert name in pins, f"{lock}: {requirement} missing: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock}: {name}=={pins[name]} does not satisfy {requirement}: run `make lock`"
        )
    assert "torchvision" not in pins
    torch = {
        "calibrate.lock.txt": Version("2.13.0+cpu"),  # the CPU-only build
        "calibrate-gpu.lock.txt": Version("2.13.0"),
    }.get(lock)
    assert pins.get("torch") == torch
    # One of the two share the `onnxruntime` module: never both.
    runtimes = {"onnxruntime", "onnxruntime-gpu"} & set(pins)
    assert runtimes == ({"onnxruntime-gpu"} if lock == "serve-gpu.lock.txt" else {"onnxruntime"})


# --- the project's source -----------------------------------------------------------------------


def test_the_source_is_copied_once_and_taken_whole_by_each_image(dockerfile: Dockerfile) -> None:
    """One stage copies the project from the build context; each stage that installs it takes
    that stage's /src with one COPY, after its lock's layer (which stays cached while only the
    code changes)."""
    from_context = {
        name: [i.arguments for i in steps if i.keyword == "COPY" and "--from" not in i.arguments]
        for name, (_, steps) in dockerfile.stages.items()
    }
    copied = {source for a in from_context["source"] for source in shlex.split(a)[:-1]}
    assert {"marginwatch", "artifact", "service", "calibration", "models"} <= copied
    assert {"pyproject.toml", "setup.py"} <= copied  # setup.py: the links' check
    installers = [
        name
        for name, (_, steps) in dockerfile.stages.items()
        if any(i.keyword == "RUN" and re.search(r"pip install .*--no-deps .*\.( |$)", i.arguments)
               for i in steps)
    ]  # fmt: skip
    assert sorted(installers) == ["build-cpu", "calibrate", "serve-gpu"]
    for name in installers:
        steps = dockerfile.stages[name][1]
        takes = [i for i in steps if i.keyword == "COPY" and i.arguments.startswith("--from=")]
        assert [i.arguments for i in takes] == ["--from=source /src ./"], name
        assert not {w for a in from_context[name] for w in shlex.split(a)[:-1]} & copied, name
        lock_install = next(i for i in steps if "--require-hashes" in i.arguments)
        assert lock_install.line < takes[0].line, f"{name}: the source before the lock"


# --- the serve image's build steps, outside a container ------------------------------------------


@dataclass
class Build:
    """The image's file system under `root`; ENV, ARG and WORKDIR as the build has them."""

    root: Path
    env: dict[str, str]
    args: dict[str, str]
    workdir: str = "/"
    not_run: list[str] = field(default_factory=list)  # RUN lines left out (NOT_RUN)

    def inside(self, path: str) -> Path:
        absolute = path if path.startswith("/") else f"{self.workdir}/{path}"
        return self.root / absolute.lstrip("/")

    def relocate(self, text: str) -> str:
        return IMAGE_PATHS.sub(lambda m: f"{self.root}/{m.group(1)}", text)

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env}


def copy_context(source: str, destination: Path) -> None:
    """COPY from the build context: folders whole, symlinks as links, .dockerignore applied."""
    path = ROOT / source
    assert path.exists() and not IGNORED(source), f"COPY {source}: not in the build context"
    if path.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        return
    for folder, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            item = Path(folder) / name
            relative = item.relative_to(ROOT).as_posix()
            if IGNORED(relative):
                continue
            target = destination / item.relative_to(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if item.is_symlink():
                target.symlink_to(os.readlink(item))
            elif item.is_file():
                shutil.copy2(item, target)


def copy(build: Build, arguments: str) -> None:
    words = [expand(w, build.variables()) for w in shlex.split(arguments)]
    flags = dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--"))
    *sources, destination = [w for w in words if not w.startswith("--")]
    into_folder = destination.endswith("/") or len(sources) > 1
    for source in sources:
        # a folder's contents go to the destination; files go into it when it is a folder
        origin = build.inside(source) if "from" in flags else ROOT / source
        target = build.inside(destination)
        if into_folder and not origin.is_dir():
            target = target / Path(source).name
        if "from" in flags:  # another stage: the same root here, so the same path
            assert origin == target, f"COPY --from {source} {destination}"
        else:
            copy_context(source, target)


def run(build: Build, command: str, log: Path) -> None:
    if command.split(maxsplit=1)[0] in NOT_RUN:
        build.not_run.append(command)
        return
    outside = [
        p for p in re.findall(r"(?<![\w.$/-])/[\w./-]+", command) if not IMAGE_PATHS.match(p)
    ]
    assert not outside, f"RUN {command}: paths outside the image's /opt and /src: {outside}"
    workdir = build.inside(build.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with log.open("a") as sink:
        sink.write(f"\n$ {command}\n")
        sink.flush()
        result = subprocess.run(
            ["/bin/sh", "-c", build.relocate(command)],
            cwd=workdir, env=build.env, stdout=sink, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    assert result.returncode == 0, f"RUN {command}: exit {result.returncode}\n{log.read_text()}"


def build_stage(build: Build, instructions: list[Instruction], log: Path) -> None:
    for instruction in instructions:
        keyword, arguments = instruction.keyword, instruction.arguments
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                if name not in NOT_SET:
                    build.env[name] = expand(build.relocate(value), build.variables())
        elif keyword == "ARG" and "=" in arguments:  # a bare `ARG NAME` keeps the global value
            name, _, value = arguments.partition("=")
            build.args[name] = value
        elif keyword == "WORKDIR":
            build.workdir = expand(arguments, build.variables())
        elif keyword == "COPY":
            copy(build, arguments)
        elif keyword == "RUN":
            run(build, arguments, log)


def base_environment(root: Path) -> dict[str, str]:
    """This machine's environment (its pip configuration included) with this CPython 3.11 as
    the image's `python`, and no virtual environment active."""
    shims = root / "base-image-bin"
    shims.mkdir(parents=True)
    interpreter = (
        Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    )
    for name in ("python", "python3"):
        (shims / name).symlink_to(interpreter)
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = os.pathsep.join([str(shims), "/usr/local/bin", "/usr/bin", "/bin"])
    return env


@contextlib.contextmanager
def serving(build: Build, command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**build.env, "MARGINWATCH_INTRA_OP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command, cwd=build.inside(build.workdir), env=env, stdout=sink, stderr=sink
        )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@pytest.fixture(scope="module")
def serve_image(
    dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Build, Path]:
    """Stages source, build-cpu and serve, run on one root (what `COPY --from` copies is in
    place)."""
    root = tmp_path_factory.mktemp("image")
    base = base_environment(root)
    base.pop("PIP_NO_CACHE_DIR", None)
    build = Build(root / "fs", {}, {})
    log = root / "build.log"
    for stage in ("source", "build-cpu", "serve"):  # each stage starts from the base image
        build.env, build.args, build.workdir = dict(base), dict(dockerfile.global_args), "/"
        build_stage(build, dockerfile.stages[stage][1], log)
    return build, log


@pytest.mark.slow
def test_serve_build_installs_exactly_the_lock(serve_image: tuple[Build, Path]) -> None:
    build, _ = serve_image
    venv = build.inside("/opt/venv")
    listed = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format=json"],
        env=build.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    installed = {str(canonicalize_name(p["name"])): p["version"] for p in json.loads(listed.stdout)}
    pins = read_lock(IMAGES / "serve.lock.txt")
    assert [command.split()[0] for command in build.not_run] == ["useradd"]  # nothing else left out
    assert installed.pop("marginwatch") == "0.1.0"
    assert installed.pop("pip")  # the installer, from the base image's ensurepip
    assert {name: Version(v) for name, v in installed.items()} == pins
    where = subprocess.run(
        [venv / "bin" / "python", "-c",
         "import marginwatch.service.__main__, onnxruntime, marginwatch\n"
         "print(marginwatch.__file__)"],
        cwd=build.root, env=build.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv)  # the installed copy, not the checkout


@pytest.mark.slow
def test_serve_image_runs_its_cmd_and_healthcheck(
    dockerfile: Dockerfile, serve_image: tuple[Build, Path]
) -> None:
    build, log = serve_image
    serve = {i.keyword: i.arguments for i in dockerfile.stages["serve"][1]}
    help_text = subprocess.run(
        [*json.loads(serve["CMD"])[:1], "--help"],
        env=build.env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--port" in help_text
    assert serve["EXPOSE"] == "8000"
    port = free_port()
    command = [
        {"0.0.0.0": "127.0.0.1", "8000": str(port)}.get(word, word)
        for word in json.loads(serve["CMD"])
    ]
    probe = json.loads(serve["HEALTHCHECK"].split(" CMD ", 1)[1])
    probe = [word.replace(":8000/", f":{port}/") for word in probe]
    with serving(build, command, log) as process:
        deadline = time.monotonic() + 60
        while subprocess.run(probe, env=build.env, capture_output=True, check=False).returncode:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"never live:\n{log.read_text()}"
            time.sleep(0.2)
        ready = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
        assert ready.status_code == 200, log.read_text()  # the store baked in from artifacts/
        models = httpx.get(f"http://127.0.0.1:{port}/v2/models/fmnist-cnn-pgd/ready", timeout=5)
        assert models.status_code == 200
