"""The calibration command line is generated from `CalibrationConfig`: every field is a flag with
its description, an environment variable sets what no flag sets, and a bad value, from either
place, exits 2 with one line that names where it came from. No job runs here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from marginwatch.artifact.cli_settings import option_flag
from marginwatch.calibration.__main__ import build_parser, load_config, main
from marginwatch.calibration.attack_registry import REGISTERED
from marginwatch.calibration.attacks import ATTACKS
from marginwatch.calibration.config import ENV_PREFIX, CalibrationConfig

ROOT = Path(__file__).resolve().parents[2]
FIELDS = CalibrationConfig.model_fields


@pytest.fixture(autouse=True)
def own_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Whatever the shell running the tests exports must not change what they see, and a job
    started by mistake must not write into the checkout's artifacts/."""
    for name in os.environ:
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv(f"{ENV_PREFIX}STORE", str(tmp_path / "store"))
    yield


def help_text(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping, so a description stays on one line
    return build_parser().format_help()


def test_help_lists_every_field_with_its_description(monkeypatch: pytest.MonkeyPatch) -> None:
    text = help_text(monkeypatch)
    for name, field in FIELDS.items():
        assert field.description, f"{name} has no description"
        # the flag (with its --no- twin for a switch), its metavar or choices if any, then the
        # description
        flag = re.escape(option_flag(name, field))
        pattern = flag + r"(?:, --no-\S+)?(?: \S+)?\s+" + re.escape(field.description)
        assert re.search(pattern, text), name
    assert re.search(
        r"--subset-size N\s+points to attack \(MARGINWATCH_CALIBRATE_SUBSET_SIZE; default: 500\)",
        text,
    )
    assert "--norm {linf,l2}" in text and "--attack NAME[:STEPS]" in text
    assert "--threshold-rule {match-fraction,target-tpr}" in text
    # a description that states its default in words gets only its variable
    assert "(default: the model or weights file name) (MARGINWATCH_CALIBRATE_MODEL_NAME)" in text
    assert "--quiet, --no-quiet" in text  # a switch the variable turned on, a flag turns off
    titles = re.findall(r"^(\S[^:\n]*):$", text, re.MULTILINE)
    assert titles == [
        "options",
        "model and data",
        "attacks and threat model",
        "threshold, estimators, pseudo-margin",
        "store, sharding, output",
        "traffic check (label-free, on the service's sampled traffic)",
    ]


def test_attack_help_is_written_from_the_registry() -> None:
    """Each registered attack's line gives its function, its norm check and its `--attack` help:
    nothing about an attack is written twice."""
    description = FIELDS["attacks"].description or ""
    listed = dict(re.findall(r"([\w-]+) \(([\w, ]+)\): ", description))
    assert set(listed) == {spec.name for spec in REGISTERED} == set(ATTACKS)
    for spec in REGISTERED:
        assert listed[spec.name] == ", ".join(spec.norms), spec.name
        assert spec.help in description
    assert "(default: fmn:100 and fab-top3:100 for linf; fmn:100 and ddn:100 for l2)" in description
    # the configuration refuses a norm the registry does not list for an attack
    with pytest.raises(ValueError, match="attack ddn does not support the linf norm"):
        CalibrationConfig(norm="linf", attacks=(("ddn", 5),))


@pytest.mark.parametrize(
    ("variables", "argv", "expected"),
    [
        ({}, [], {"subset_size": 500, "attacks": (), "merge_only": False}),
        ({"SUBSET_SIZE": "123"}, [], {"subset_size": 123}),
        ({"SUBSET_SIZE": "123"}, ["--subset-size", "77"], {"subset_size": 77}),
        ({"SUBSET_SIZE": "x"}, ["--subset-size", "77"], {"subset_size": 77}),  # never read
        ({"MODEL_NAME": "from-env"}, ["--name", "from-flag"], {"model_name": "from-flag"}),
        ({"ATTACKS": "fmn:15, fab"}, [], {"attacks": (("fmn", 15), ("fab", 100))}),
        (
            {"ATTACKS": "fmn:15,fab"},
            ["--attack", "ddn", "--norm", "l2"],
            {"attacks": (("ddn", 100),)},
        ),
        ({"MERGE_ONLY": "true", "QUIET": "1"}, [], {"merge_only": True, "quiet": True}),
        ({"QUIET": "true"}, ["--no-quiet"], {"quiet": False}),
        ({}, ["--threshold-rule", "target-tpr", "--target-tpr", "1"], {"target_tpr": 1.0}),
        ({"STORE": "/from/env"}, [], {"store": Path("/from/env")}),
        ({}, ["--json"], {"quiet": True}),
        ({}, [], {"input_range": (0.0, 1.0), "mean": (0.0,), "std": (1.0,)}),
        (
            {"MEAN": "0.485,0.456,0.406", "INPUT_RANGE": "0,255"},
            ["--std", "0.229,0.224", "--std", "0.225"],
            {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_range": (0, 255)},
        ),
        ({}, ["--preflight-only"], {"preflight_only": True}),
    ],
)
def test_flag_beats_variable_beats_default(
    variables: dict[str, str], argv: list[str], expected: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name, value in variables.items():
        monkeypatch.setenv(ENV_PREFIX + name, value)
    config, as_json = load_config(argv)
    assert {name: getattr(config, name) for name in expected} == expected
    assert as_json == ("--json" in argv)


@pytest.mark.parametrize(
    ("variables", "argv", "message"),
    [
        ({}, ["--subset-size", "1"], "--subset-size: input should be greater than or equal to 2"),
        ({}, ["--subset-size", "many"], "--subset-size: input should be a valid integer"),
        ({"SUBSET_SIZE": "1"}, [], "MARGINWATCH_CALIBRATE_SUBSET_SIZE: input should be greater"),
        ({}, ["--target-tpr", "1.5"], "--target-tpr: input should be less than or equal to 1"),
        ({}, ["--target-tpr", "0"], "--target-tpr: input should be greater than 0, got '0'"),
        ({}, ["--norm", "l3"], "argument --norm: invalid choice: 'l3'"),
        ({}, ["--threshold-rule", "best"], "argument --threshold-rule: invalid choice"),
        ({"QUIET": "maybe"}, [], "MARGINWATCH_CALIBRATE_QUIET: input should be a valid boolean"),
        ({"ATTACKS": "fmn,pgd"}, [], "MARGINWATCH_CALIBRATE_ATTACKS: unknown attack 'pgd'"),
        ({}, ["--shard", "2", "--num-shards", "2"], "shard must lie in [0, 2), got 2"),
        ({}, ["--subset-sise", "60"], "unrecognized arguments: --subset-sise"),
        ({}, ["--version", "../x"], "version '../x' is not a valid name"),
        ({}, ["--model", "my model.pt"], "'my model' (from --model) cannot name a model"),
        ({}, ["--input-range", "255,0"], "input range must have LOW < HIGH"),
        (
            {},
            ["--input-range", "0"],
            "--input-range: input range takes two numbers, LOW,HIGH; got 0",
        ),
        ({"STD": "1,-1"}, [], "MARGINWATCH_CALIBRATE_STD: std must be positive"),
        ({}, ["--mean", "half"], "--mean: input should be a valid number"),
        ({}, ["--eps-grid", "0.05,wide"], "--eps-grid takes numbers, EPS,EPS,...; got 'wide'"),
        ({"EPS_GRID": "0.05,-1"}, [], "--eps-grid budgets must be positive and finite, got -1"),
        ({}, ["--margin-interval", "1"], "--margin-interval: input should be less than 1"),
    ],
)
def test_bad_value_exits_2_with_one_line_naming_the_option(
    variables: dict[str, str], argv: list[str], message: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    for name, value in variables.items():
        monkeypatch.setenv(ENV_PREFIX + name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("marginwatch-calibrate: ") and err.count("\n") == 1, err
    assert message in err
    assert not Path(os.environ[f"{ENV_PREFIX}STORE"]).exists()


def test_installed_command_answers_help_without_torch_and_fails_without_traceback() -> None:
    # `--help` must stay instant: torch (seconds to import) is loaded only to run the job.
    probe = "import sys; from marginwatch.calibration.__main__ import build_parser; " \
        "build_parser().format_help(); print('torch' in sys.modules)"  # fmt: skip
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "False"
    bad = subprocess.run(
        [sys.executable, "-m", "marginwatch.calibration", "--seed", "-1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr == (
        "marginwatch-calibrate: --seed: input should be greater than or equal to 0, got '-1'\n"
    )


def manifest_args(path: Path) -> Iterator[list[str]]:
    """The argument list of each container that runs the job, as text (no YAML dependency)."""
    for block in re.findall(r"^\s+args:\n((?:\s+- .*\n)+)", path.read_text(), re.MULTILINE):
        yield [item.replace("$(JOB_COMPLETION_INDEX)", "0") for item in re.findall(
            r"^\s+- (\S+)$", block, re.MULTILINE)]  # fmt: skip


@pytest.mark.parametrize("name", ["base/calibration-cronjob.yaml", "calibration-sharded-job.yaml"])
def test_deploy_manifests_pass_a_valid_command_line(name: str) -> None:
    """Stronger than looking the flags up in the source: the generated parser and the model
    accept each manifest's whole argument list."""
    runs = list(manifest_args(ROOT / "deploy" / "kubernetes" / name))
    assert runs
    for argv in runs:
        config, _ = load_config(argv)
        assert config.model == "fmnist-cnn-pgd" and config.store == Path("/store")


def test_config_built_in_code_keeps_its_checks_and_norm_defaults() -> None:
    config = CalibrationConfig(norm="l2", attacks=(("fmn", 5),), store=Path("s"))
    assert config.attacks == (("fmn", 5),) and config.resolved_eps == 1.5
    assert CalibrationConfig(norm="l2").resolved_attacks == (("fmn", 100), ("ddn", 100))
    assert CalibrationConfig().resolved_attacks == (("fmn", 100), ("fab-top3", 100))
    with pytest.raises(ValueError, match="eps must be positive"):
        CalibrationConfig(eps=float("nan"))
    with pytest.raises(ValueError, match="each attack may appear once"):
        CalibrationConfig(attacks=("fmn:10", "fmn:20"))
