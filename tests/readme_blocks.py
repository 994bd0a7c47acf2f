"""The fenced blocks of a Markdown file, and the comparison of a command's output with the output
a document shows for it (tests/test_readme.py).

A block is a command (```sh, ```python) or text; a text block right after a command (```, ```json,
```text) is that command's shown output. Every block knows the level-2 section it sits in, so that
a command can be run after the commands before it in its section, as a reader would.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMAND_LANGUAGES = frozenset({"sh", "python"})
OUTPUT_LANGUAGES = frozenset({"", "json", "text"})
FENCE = re.compile(r"^```(\S*)\s*$")
# A calibration version: today `20261201T193456Z`; a sub-second part or a suffix may follow.
VERSION = re.compile(r"\b\d{8}T\d{6}(?:[.,]\d+)?Z(?:[-_][0-9A-Za-z]+)?\b")
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w])")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (1-based line of its opening fence), its language, its
    text (without the fences) and the level-2 heading above it."""

    name: str  # the file, as the test ids show it
    line: int
    language: str
    text: str
    section: str
    output: Block | None = None  # a command's shown output

    @property
    def is_command(self) -> bool:
        return self.language in COMMAND_LANGUAGES

    @property
    def label(self) -> str:
        """A test id: file, line, language and the first words of the block."""
        first = next((line.strip() for line in self.text.splitlines() if line.strip()), "")
        words = re.sub(r"[^\w./:=-]+", " ", first).strip()[:48]
        return f"{self.name}:{self.line}:{self.language or 'text'}:{words}"


def _fenced(path: Path) -> list[tuple[int, int, str, str]]:
    """(opening line, closing line, language, text) of each fenced block, in order."""
    blocks = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{index + 1}: a fence that is never closed")
        blocks.append((index + 1, end + 1, opening.group(1), "\n".join(lines[index + 1 : end])))
        index = end + 1
    return blocks


def _sections(path: Path) -> list[tuple[int, str]]:
    """(line, title) of each level-2 heading outside fences."""
    headings = []
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside and line.startswith("## "):
            headings.append((number, line[3:].strip()))
    return headings


def read_blocks(path: Path, root: Path) -> list[Block]:
    """Every block of `path`; a command's output block is attached to it, not listed apart."""
    name = path.relative_to(root).as_posix()
    headings = _sections(path)
    fenced = _fenced(path)
    blocks: list[Block] = []
    previous_end = -1
    for start, end, language, text in fenced:
        section = next((title for line, title in reversed(headings) if line < start), "")
        block = Block(name, start, language, text, section)
        last = blocks[-1] if blocks else None
        if (
            last is not None
            and last.is_command
            and last.output is None
            and language in OUTPUT_LANGUAGES
            and start == previous_end + 1
        ):
            blocks[-1] = Block(last.name, last.line, last.language, last.text, section, block)
        else:
            blocks.append(block)
        previous_end = end
    return blocks


# --- comparing outputs ----------------------------------------------------------------------


def masked(text: str) -> str:
    """`text` with its version ids and numbers replaced by placeholders and runs of blanks made
    one: the shape of a line whose figures vary from run to run."""
    text = VERSION.sub("<version>", text)
    text = NUMBER.sub("<n>", text)
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.strip().splitlines())


def _shown_close(shown: float, actual: float) -> bool:
    """Whether `actual` is the figure a document shows as `shown`: equal within a relative 1e-4
    (float32 results differ in their last digits from one machine to another)."""
    return math.isclose(shown, actual, rel_tol=1e-4, abs_tol=1e-7)


def text_mismatch(shown: str, actual: str, *, exact_numbers: bool) -> str | None:
    """Why `actual` is not the output `shown` (None if it is): equal line shapes, and with
    `exact_numbers` every number as shown."""
    if masked(shown) != masked(actual):
        return f"shown:\n{masked(shown)}\nactual:\n{masked(actual)}"
    if exact_numbers:
        wanted = NUMBER.findall(VERSION.sub("", shown))
        for want, got in zip(wanted, NUMBER.findall(VERSION.sub("", actual)), strict=True):
            if not _shown_close(float(want), float(got)):
                return f"shown {want}, got {got}"
    return None


def json_mismatch(shown: Any, actual: Any, vary: frozenset[str], where: str = "$") -> str | None:
    """Why `actual` differs from the JSON `shown` (None if it does not): the same keys, lists of
    the same length, equal strings and booleans, numbers within `_shown_close`; a value under a
    key in `vary` need only have the same type."""
    if isinstance(shown, dict) and isinstance(actual, dict):
        return _dict_mismatch(shown, actual, vary, where)
    if isinstance(shown, list) and isinstance(actual, list):
        if len(shown) != len(actual):
            return f"{where}: {len(shown)} items shown, {len(actual)} returned"
        problems = (
            json_mismatch(want, got, vary, f"{where}[{index}]")
            for index, (want, got) in enumerate(zip(shown, actual, strict=True))
        )
        return next(filter(None, problems), None)
    numbers = (int, float)
    if isinstance(shown, numbers) and isinstance(actual, numbers) and not isinstance(shown, bool):
        close = _shown_close(float(shown), float(actual))
        return None if close else f"{where}: {actual} returned, {shown} shown"
    return None if shown == actual else f"{where}: {actual!r} returned, {shown!r} shown"


def _dict_mismatch(
    shown: dict[str, Any], actual: dict[str, Any], vary: frozenset[str], where: str
) -> str | None:
    if shown.keys() != actual.keys():
        return f"{where}: keys {sorted(shown)} shown, {sorted(actual)} returned"
    for key, want in shown.items():
        if key in vary:
            if type(want) is not type(actual[key]):
                return f"{where}.{key}: {type(actual[key]).__name__}, not as shown"
            continue
        problem = json_mismatch(want, actual[key], vary, f"{where}.{key}")
        if problem:
            return problem
    return None


def output_mismatch(
    output: Block, actual: str, *, vary: frozenset[str] = frozenset(), exact_numbers: bool = True
) -> str | None:
    """Why a command's `actual` standard output is not its shown `output` (None if it is)."""
    if output.language == "json" or _is_json(output.text):
        return json_mismatch(json.loads(output.text), json.loads(actual), vary)
    return text_mismatch(output.text, actual, exact_numbers=exact_numbers)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
