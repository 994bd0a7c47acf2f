"""What pyproject.toml cannot tell setuptools about the one import namespace, whose `marginwatch/`
holds relative links to the top-level folders (docs/architecture.md, "One import namespace").

- A checkout whose links arrived as text files (a zip download, git on Windows without symlinks)
  fails every build (wheel, sdist, editable) with one message saying so; setuptools' package
  finder would otherwise find `marginwatch` alone and build an empty wheel without a word.
- The sdist holds the repository's tree (MANIFEST.in) with the links kept as links, so a wheel
  built from it is built as from a checkout; setuptools would copy each file twice, once through
  its link.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
LINKED = ("artifact", "calibration", "models", "service")


def link_problems(root: Path) -> list[str]:
    """What is wrong with each of `marginwatch/<folder>`: it must lead to a package."""
    problems = []
    for name in LINKED:
        link = root / "marginwatch" / name
        if (link / "__init__.py").is_file():
            continue
        if link.is_file() and not link.is_symlink():
            text = link.read_text(errors="replace").strip()[:40]
            problems.append(f"marginwatch/{name} is a text file ({text!r}), not a link")
        elif link.is_symlink():
            problems.append(f"marginwatch/{name} links to {os.readlink(link)}, no package there")
        else:
            problems.append(f"marginwatch/{name} is missing")
    return problems


def check_links(root: Path) -> None:
    problems = link_problems(root)
    if problems:
        raise SystemExit(
            "marginwatch cannot be built from this copy: "
            + "; ".join(problems)
            + ". Its links to the top-level folders were lost (a zip download, or git on "
            "Windows without symlinks): clone the repository with git (on Windows: Developer "
            "Mode, then `git clone -c core.symlinks=true`), or install a built wheel."
        )


class LinkedSdist(sdist):
    """The sdist's tree as the repository's: each linked folder's files once, under its own
    folder, and `marginwatch/<folder>` as the same relative link (tar stores links as links)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        through_links = tuple(f"marginwatch/{name}/" for name in LINKED)
        own = [path for path in files if not Path(path).as_posix().startswith(through_links)]
        super().make_release_tree(base_dir, own)
        for name in LINKED:
            os.symlink(f"../{name}", os.path.join(base_dir, "marginwatch", name))


check_links(ROOT)
setup(cmdclass={"sdist": LinkedSdist})
