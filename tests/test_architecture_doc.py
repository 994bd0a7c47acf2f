"""docs/architecture.md's checkable claims, read from the document itself: the direction of the
imports between the four packages, as import-linter's contracts in pyproject.toml state and
`lint-imports` checks them (every import, at module level or inside a function, direct or through
other modules; torch in the service's import closure), and the files its tables and its sections
name.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("artifact", "models", "calibration", "service")
# The sentence stating the directions: "`artifact` imports nothing of ours; `models` imports
# `artifact`; `calibration` imports `models` and `artifact`; `service` imports only `artifact`"
CLAUSE = re.compile(r"`(\w+)` imports (nothing of ours|(?:only )?`\w+`(?: and `\w+`)*)")


def sections() -> dict[str, str]:
    """The text of each level-2 section, by title ("models/", "service/", ...)."""
    parts = re.split(r"^## (.+)$", DOC.read_text(), flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def documented_imports() -> dict[str, set[str]]:
    """Which of our packages each package may import, as the document states it."""
    return {
        package: set(re.findall(r"`(\w+)`", imports))
        for package, imports in CLAUSE.findall(DOC.read_text())
    }


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "marginwatch" and config["include_external_packages"]
    return {contract["id"]: contract for contract in config["contracts"]}


def contracted_imports() -> dict[str, set[str]]:
    """Which of our packages each package may import, as the contracts allow it: the layers
    below its own, less what a forbidden contract names."""
    layers = [
        [name.strip().removeprefix("marginwatch.") for name in layer.split("|")]
        for layer in contracts()["layers"]["layers"]
    ]
    allowed = {
        package: {below for lower in layers[index + 1 :] for below in lower}
        for index, layer in enumerate(layers)
        for package in layer
    }
    for contract in contracts().values():
        if contract["type"] == "forbidden":
            for source in contract["source_modules"]:
                forbidden = {
                    name.removeprefix("marginwatch.") for name in contract["forbidden_modules"]
                }
                allowed[source.removeprefix("marginwatch.")] -= forbidden
    return allowed


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    kept = f"Contracts: {len(contracts())} kept, 0 broken."
    assert kept in result.stdout, result.stdout


def test_the_contracts_are_the_documented_directions() -> None:
    assert documented_imports() == contracted_imports()
    assert set(documented_imports()) == set(PACKAGES)
    torch = contracts()["no-torch-served"]
    assert torch["type"] == "forbidden" and torch["forbidden_modules"] == ["torch"]
    assert set(torch["source_modules"]) == {"marginwatch.service", "marginwatch.artifact"}
    assert "never torch" in DOC.read_text()
    assert "No torch, nothing pickled" in sections()["artifact/"]


def test_lint_imports_catches_each_kind_of_break(tmp_path: Path) -> None:
    """On a copy of the sources with three stray imports (one inside a function, one that
    reaches torch only through another module): every contract breaks."""
    for name in ("marginwatch", *PACKAGES):
        shutil.copytree(
            ROOT / name, tmp_path / name, symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "weights", "datasets"),
        )  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "artifact" / "graph.py").open("a") as graph:
        graph.write("import torch\n")  # artifact → torch, and service → artifact → torch
    with (tmp_path / "artifact" / "hashing.py").open("a") as hashing:
        hashing.write("from marginwatch.models import training\n")  # a layer upwards
    with (tmp_path / "service" / "errors.py").open("a") as errors:
        errors.write("\n\ndef _late() -> None:\n    from marginwatch.calibration import job\n")
    result = lint_imports(tmp_path)  # lint-imports imports `marginwatch` from its cwd first
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Contracts: 0 kept, {len(contracts())} broken." in result.stdout, result.stdout
    assert "marginwatch.service.errors -> marginwatch.calibration.job" in result.stdout
    assert "marginwatch.artifact.graph -> torch" in result.stdout


def named_files(section: str) -> list[str]:
    """The modules a section's text names in backticks: `x.py`, `a/b.py`."""
    return re.findall(r"`([\w./]+\.py)`", section)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_file_named_exists(package: str) -> None:
    """A table's first column and the text of the package's section: each name is a file of the
    package, or a path from the repository's root where it has a folder in it."""
    body = sections()[f"{package}/"]
    table = [
        name
        for row in re.findall(r"^\| (.+?) \|", body, re.M)
        for name in re.findall(r"`([^`]+)`", row)
    ]
    assert table or package == "calibration", f"no file table in {package}/"
    for name in {*table, *named_files(body)}:
        path = ROOT / package / name
        if not path.exists():
            path = ROOT / name
        assert path.exists(), f"docs/architecture.md, {package}/: {name} does not exist"
