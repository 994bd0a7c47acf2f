"""`marginwatch-serve`'s command line: one flag per setting, and a flag beats its environment
variable, which beats the default."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from marginwatch.service.__main__ import main, settings_from
from marginwatch.service.settings import Settings


def help_blocks() -> dict[str, str]:
    """The console script's `--help`, as each flag's block of text (whitespace collapsed)."""
    result = subprocess.run(
        [sys.executable, "-m", "marginwatch.service", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "10000"},  # no wrapping: words stay whole
    )
    blocks = re.split(r"\n  (?=--)", result.stdout.split("\noptions:\n", 1)[1])
    return {block.split()[0].rstrip(","): " ".join(block.split()) for block in blocks}


def test_console_script_help_explains_every_option() -> None:
    blocks = help_blocks()
    for name, field in Settings.model_fields.items():
        block = blocks.get(f"--{name.replace('_', '-')}")
        assert block is not None, f"no flag for {name}"
        assert field.description is not None
        assert " ".join(field.description.split()) in block, name
        assert f"(MARGINWATCH_{name.upper()}; default: " in block, name
    assert blocks["--port"].endswith("default: 8000)")
    assert "--no-protect-health" in blocks["--protect-health"]
    assert "{text,json}" in blocks["--log-format"]


def test_a_flag_beats_its_variable_which_beats_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MARGINWATCH_PORT", "1234")
    monkeypatch.setenv("MARGINWATCH_MAX_BATCH_SIZE", "128")
    monkeypatch.setenv("MARGINWATCH_ACCESS_LOG", "true")
    settings = settings_from(
        ["--port", "4321", "--no-access-log", "--models", "a,b", "--max-batch-wait-s", "0.01"]
    )
    assert settings.port == 4321
    assert settings.access_log is False
    assert settings.max_batch_size == 128
    assert settings.host == "127.0.0.1"
    assert settings.models == ["a", "b"]
    assert settings.max_batch_wait_s == 0.01
    # a list's flag repeats or takes commas, as its variable does
    assert settings_from(["--models", "a", "--models", "b,c"]).models == ["a", "b", "c"]


def test_a_bad_value_stops_naming_where_it_came_from_but_not_the_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--port", "70000"]) == 2
    error = capsys.readouterr().err
    assert "invalid settings" in error and "--port: input should be less than" in error
    assert "70000" not in error
    monkeypatch.setenv("MARGINWATCH_MAX_BATCH_SIZE", "-3")
    assert main([]) == 2
    error = capsys.readouterr().err
    assert "MARGINWATCH_MAX_BATCH_SIZE: input should be greater" in error and "-3" not in error
