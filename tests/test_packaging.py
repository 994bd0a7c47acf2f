"""The distribution installs one import name, `marginwatch`, and a user's own `models`,
`service` or `calibration` package neither breaks ours nor is shadowed by it.

How it is built (docs/architecture.md, "One import namespace"): `marginwatch/` links to the
top-level folders; the sdist holds the repository's tree with those links; a wheel built from the
sdist holds every subpackage; a copy whose links arrived as text files fails to build, loudly.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from marginwatch.artifact import store
from marginwatch.models.data import Dataset, save_npz

PROJECT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sys.executable).parent
LINKED = ("artifact", "calibration", "models", "service")
# what setuptools adds to an sdist beside the tree
SDIST_METADATA = {"PKG-INFO", "setup.cfg"}


def repository_files() -> list[str]:
    """The checkout's files as git sees them: tracked, or new and not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    return sorted(name for name in listed if name and os.path.lexists(PROJECT / name))


def copy_checkout(destination: Path) -> Path:
    """The repository's files copied as a fresh clone would hold them, links as links."""
    for name in repository_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (PROJECT / name).is_symlink():
            target.symlink_to(os.readlink(PROJECT / name))
        else:
            shutil.copy2(PROJECT / name, target)
    return destination


def pip_wheel(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist, built from a copy of the checkout (so that no build output lands in it), and
    the wheel built from that sdist, as `uv build` and `python -m build` do."""
    root = tmp_path_factory.mktemp("dist")
    source = copy_checkout(root / "src")
    subprocess.run(
        [sys.executable, "-c",
         f"from setuptools import build_meta; build_meta.build_sdist({str(root / 'sdist')!r})"],
        cwd=source, capture_output=True, check=True,
    )  # fmt: skip
    (sdist,) = (root / "sdist").glob("marginwatch-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    result = pip_wheel(unpacked, root / "wheel")
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (root / "wheel").glob("marginwatch-*.whl")
    return sdist, wheel


def test_installed_metadata_names_one_top_level_package() -> None:
    top_level = importlib.metadata.distribution("marginwatch").read_text("top_level.txt")
    assert top_level is not None
    assert top_level.split() == ["marginwatch"]


def test_sdist_holds_the_repository_tree_with_its_links(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name}
    files = {name for name, member in members.items() if not member.isdir()}
    metadata = {name for name in files if name.startswith("marginwatch.egg-info/")}
    assert files - metadata - SDIST_METADATA == set(repository_files())
    for name in LINKED:
        link = members[f"marginwatch/{name}"]
        assert link.issym() and link.linkname == f"../{name}", name
        assert f"{name}/__init__.py" in files
        assert not [f for f in files if f.startswith(f"marginwatch/{name}/")]  # stored once


def test_wheel_from_the_sdist_holds_only_the_marginwatch_namespace(
    built: tuple[Path, Path],
) -> None:
    _, wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"marginwatch"}
    for subpackage in ("service", "calibration", "models", "artifact", "models/loaders"):
        assert f"marginwatch/{subpackage}/__init__.py" in names
    for name in repository_files():  # every module of every linked folder
        if name.endswith(".py") and name.split("/")[0] in LINKED:
            assert f"marginwatch/{name}" in names, name
    assert "marginwatch/models/weights/fmnist-cnn-pgd.safetensors" in names
    assert "marginwatch/models/datasets/fashion-mnist-test-subset.npz" in names


def test_a_copy_whose_links_are_text_files_fails_to_build(tmp_path: Path) -> None:
    """As a zip download or a Windows checkout without symlinks holds them: the link's target
    as the file's text. setuptools alone would build a wheel of `marginwatch/__init__.py`."""
    source = copy_checkout(tmp_path / "src")
    for name in LINKED:
        (source / "marginwatch" / name).unlink()
        (source / "marginwatch" / name).write_text(f"../{name}")
    result = pip_wheel(source, tmp_path / "wheel")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "marginwatch cannot be built from this copy" in output, output
    for name in LINKED:
        assert f"marginwatch/{name} is a text file ('../{name}'), not a link" in output
    assert "git clone -c core.symlinks=true" in output
    assert not list((tmp_path / "wheel").glob("*.whl"))


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
