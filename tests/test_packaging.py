"""The distribution installs one import name, `marginwatch`, and a user's own `models`,
`service` or `calibration` package neither breaks ours nor is shadowed by it."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from marginwatch.artifact import store
from marginwatch.models.data import Dataset, save_npz

PROJECT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent


def test_installed_metadata_names_one_top_level_package() -> None:
    top_level = importlib.metadata.distribution("marginwatch").read_text("top_level.txt")
    assert top_level is not None
    assert top_level.split() == ["marginwatch"]


def test_wheel_holds_only_the_marginwatch_namespace(tmp_path: Path) -> None:
    # Built from a copy so that setuptools' build/ folder never lands in the checkout.
    source = tmp_path / "src"
    shutil.copytree(
        PROJECT, source, symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", "*cache*", "build", "*.egg-info", "bench"),
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("marginwatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"marginwatch"}
    for subpackage in ("service", "calibration", "models", "artifact"):
        assert f"marginwatch/{subpackage}/__init__.py" in names
    assert "marginwatch/models/weights/fmnist-cnn-pgd.safetensors" in names
    assert "marginwatch/models/datasets/fashion-mnist-test-subset.npz" in names


def _user_project(root: Path) -> Path:
    """A user's repository with its own `models`, `service` and `calibration` packages; only
    `models.build` is meant to be used (through `--model models:build`)."""
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text(
        "from marginwatch.models.architectures import FashionMnistCNN\n"
        "def build():\n"
        "    return FashionMnistCNN()\n"
    )
    for shadow in ("service", "calibration"):
        (root / shadow).mkdir()
        (root / shadow / "__init__.py").write_text(
            f"raise ImportError('the user\\'s own {shadow} package was imported')\n"
        )
    return root


@pytest.mark.slow
def test_user_models_package_does_not_change_what_calibrate_imports(
    tmp_path: Path, fashion_subset: Dataset
) -> None:
    user = _user_project(tmp_path / "user")
    data = tmp_path / "data.npz"
    save_npz(fashion_subset.subset(np.arange(120)), data)
    env = {**os.environ, "PYTHONPATH": str(user), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [SCRIPTS / "marginwatch-calibrate", "--model", "models:build", "--name", "user-cnn",
         "--weights", str(PROJECT / "models" / "weights" / "fmnist-cnn-pgd.safetensors"),
         "--dataset", str(data), "--subset-size", "30", "--store", str(tmp_path / "store"),
         "--attack", "fmn:5", "--bootstrap", "20", "--pseudo-margin", "never", "--quiet"],
        cwd=user, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = store.read_record(store.current_dir(tmp_path / "store", "user-cnn"))
    assert record.model_name == "user-cnn" and len(record.class_names) == 10
