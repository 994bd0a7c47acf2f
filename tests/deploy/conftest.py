"""What the deployment tests share: every kustomize variant, built once per session. The tools
(promtool, kubectl) are fixtures of the top-level conftest, which the traffic-loop test shares."""

from __future__ import annotations

import os
import subprocess
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
    "registry": DEPLOY / "kubernetes" / "overlays" / "registry",
    "kserve": DEPLOY / "kserve",
}
WITH_COMPONENT = {f"{name}+prometheus-operator": name for name in ("base", "gpu", "kserve")}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `variant` runs once per build (test modules cannot import this one)."""
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", [*VARIANTS, *WITH_COMPONENT])


@pytest.fixture(scope="session")
def variant_folders() -> dict[str, Path]:
    return dict(VARIANTS)


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
