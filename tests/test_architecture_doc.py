"""docs/architecture.md's checkable claims, read from the document itself: the direction of the
imports between the four packages, and the files its tables and its sections name.

The import directions are checked statically here (every `import` of every module, read with
`ast`); that the service also runs with torch blocked is tests/service/test_app.py's test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("artifact", "models", "calibration", "service")
# The sentence stating the directions: "`artifact` imports nothing of ours; `models` imports
# `artifact`; `calibration` imports `models` and `artifact`; `service` imports only `artifact`
# and `models.data`": each name a package, or one module of it
CLAUSE = re.compile(r"`(\w+)` imports (nothing of ours|(?:only )?`[\w.]+`(?: and `[\w.]+`)*)")


def sections() -> dict[str, str]:
    """The text of each level-2 section, by title ("models/", "service/", ...)."""
    parts = re.split(r"^## (.+)$", DOC.read_text(), flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def allowed_imports() -> dict[str, set[str]]:
    """Which of our packages each package may import, as the document states it."""
    claims = {}
    for package, imports in CLAUSE.findall(DOC.read_text()):
        claims[package] = set(re.findall(r"`([\w.]+)`", imports))
    return claims


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module a package's files import, absolute names (relative imports resolved to our
    own package), by file."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(f"marginwatch.{package}" if node.level else node.module or "")
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_document_states_every_package_s_imports() -> None:
    assert set(allowed_imports()) == set(PACKAGES), allowed_imports()


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_the_way_the_document_says(package: str) -> None:
    allowed = allowed_imports()[package] | {package}
    for path, names in imported_modules(package).items():
        ours = {name.removeprefix("marginwatch.") for name in names}
        ours = {name for name in ours if name.split(".")[0] in PACKAGES}
        stray = {name for name in ours if not any(within(name, a) for a in allowed)}
        assert not stray, f"{path} imports {sorted(stray)}"


def within(module: str, allowed: str) -> bool:
    """`models.data.x` is within `models.data` and within `models`, not within `model`."""
    return module == allowed or module.startswith(f"{allowed}.")


def test_service_and_artifact_import_no_torch() -> None:
    """ "never torch" (service) and "No torch, nothing pickled" (artifact), as the document says."""
    text = DOC.read_text()
    assert "never torch" in text and "No torch, nothing pickled" in sections()["artifact/"]
    for package, banned in (("service", {"torch"}), ("artifact", {"torch", "pickle"})):
        for path, names in imported_modules(package).items():
            roots = {name.split(".")[0] for name in names}
            assert not roots & banned, f"{path} imports {sorted(roots & banned)}"


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
