"""`marginwatch-calibrate` (also `python -m marginwatch.calibration`): the job's command line.

The options are the fields of `config.CalibrationConfig`: flag, help, default and choices are
generated from it (`artifact.cli_settings`, as for every command), so they are written once.
Each can also be set by the environment variable `MARGINWATCH_CALIBRATE_<FIELD>`; a flag wins
over the variable, the variable over the default.

Exit codes: 0 published (or shard done, or `--preflight-only` passed, or the traffic check
published), 1 verification failed, 2 bad input (every preflight check, and every traffic-check
problem found before the attacks: no traffic, none since --since, every shard broken, another
model than the served one; one line, before any attack), 3 another run of the same model holds
the lock. With --traffic DIR and neither --model nor --name, every model with traffic in DIR
that the store serves is checked in turn, and the exit code is the highest of theirs. Meant for
cron: idempotent, lock-protected, safe to kill.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
import typing
from collections.abc import Collection, Sequence
from typing import NoReturn

from pydantic import ValidationError

if typing.TYPE_CHECKING:
    from marginwatch.artifact.schema import CalibrationRecord
    from marginwatch.artifact.traffic import TrafficCheck
    from marginwatch.calibration.job import RunResult
    from marginwatch.calibration.preflight import PreflightReport
    from marginwatch.calibration.traffic_check import TrafficResult

from marginwatch.artifact import cli_settings, store
from marginwatch.calibration.config import (
    ENV_PREFIX,
    HELP_GROUPS,
    CalibrationConfig,
    ConfigError,
)

PROG = "marginwatch-calibrate"
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY = 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit 2 through main, not argparse's usage block (dozens of options) above
        # it: the same answer as a bad value that pydantic refuses.
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Measure input margins on a subset with minimum-norm attacks, check margin "
        "consistency, fit the brittleness threshold λ and the robust-accuracy estimators, and "
        "publish a verified version (model.onnx, calibration.json, report.html) to the store. "
        "With --traffic DIR, check the served version's flag on a sample of its own traffic "
        "instead (traffic-check.json beside it; --refit also publishes a refitted version).",
        epilog="Every option can also be set by the environment variable its help names: lists "
        f"comma-separated ({ENV_PREFIX}ATTACKS=fmn,fab:200; a list's flag may also be repeated), "
        f"switches true or false ({ENV_PREFIX}QUIET=true). A flag wins over the variable, the "
        "variable over the default.",
    )
    sections = cli_settings.add_options(parser, CalibrationConfig, HELP_GROUPS)
    # Not a setting of the job but of this command's output, listed with the output options.
    sections[HELP_GROUPS["store"]].add_argument(
        "--json", action="store_true", help="print calibration.json, not a summary"
    )
    return parser


def describe(error: ValidationError, given: Collection[str]) -> str:
    """pydantic's findings as one line, each naming the flag or variable the value came from."""
    return "; ".join(cli_settings.problems(error, CalibrationConfig, given))


def load_config(argv: Sequence[str] | None = None) -> tuple[CalibrationConfig, bool]:
    """The run's settings (flag, else variable, else default) and whether to print JSON; bad
    input raises ConfigError."""
    arguments = build_parser().parse_args(argv)
    given = cli_settings.given_values(arguments, CalibrationConfig)
    as_json = bool(arguments.json)
    if as_json:
        given["quiet"] = True  # progress bars would interleave with the JSON in a pod's log
    try:
        return CalibrationConfig(**given), as_json
    except ValidationError as error:
        raise ConfigError(describe(error, given)) from None


def _summary(record: CalibrationRecord) -> str:
    estimate = record.robust_accuracy
    lines = [
        f"model            {record.model_name}  version {record.version}",
        f"threat model     {record.threat_model.norm}  ε = {record.threat_model.eps:g}",
        f"score            {record.score_kind}   λ = {record.threshold:.4f} "
        f"({record.threshold_rule}), guard band {record.guard_band:.1e}",
        f"subset           {record.subset.size} points of {record.subset.dataset}:"
        f"{record.subset.split}, seed {record.subset.seed}, {record.censored} censored",
        f"consistency      Kendall τ = {record.kendall_tau:.3f}",
        f"detection        AUROC {record.auroc:.3f}  AUPR {record.aupr:.3f}  "
        f"FPR@95 {record.fpr_at_95_tpr:.3f}",
        f"subset accuracy  clean {record.subset_clean_accuracy:.3f}  "
        f"robust {record.subset_robust_accuracy:.3f}",
    ]
    for item in record.robust_accuracy_estimates:
        marker = "*" if item.method == estimate.method else " "
        lines.append(
            f"robust accuracy{marker} {item.method:10s} {item.estimate:.3f} "
            f"[{item.ci_low:.3f}, {item.ci_high:.3f}] on {record.big_set.size} points"
        )
    if record.pseudo_margin is not None:
        facts = record.pseudo_margin
        if facts.pseudo_margin_tau is not None and facts.pseudo_margin_auroc is not None:
            lines.append(
                f"pseudo-margin    τ {facts.logit_margin_tau:.3f} → {facts.pseudo_margin_tau:.3f}"
                f", AUROC {facts.logit_margin_auroc:.3f} → {facts.pseudo_margin_auroc:.3f} "
                f"({'chosen' if facts.chosen else 'not chosen'})"
            )
        if facts.choice is not None:
            lines.append(f"score choice     {facts.choice.chosen}: {facts.choice.reason}")
    return "\n".join(lines)


def _announce(report: PreflightReport, *, notes: bool = True) -> None:
    # stderr, at once: the attacks that follow take minutes, and stdout is the result's
    if notes:
        _notes(report)
    print(report.summary(), file=sys.stderr, flush=True)


def _notes(report: PreflightReport) -> None:
    """What the run chose that its settings did not say (all of a small dataset, say)."""
    for note in report.notes:
        _note(note)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_summary(check: TrafficCheck) -> str:
    def ratio(name: str, value: float, low: float, high: float) -> str:
        return f"{name:16s} {value:.3f} [{low:.3f}, {high:.3f}]"

    def maybe(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    nonrobust, flagged = check.nonrobust, check.flagged
    return "\n".join(
        [
            f"traffic check    {check.model_name}  version {check.version}: {nonrobust.total} of "
            f"{check.available_points} points since {_utc(check.traffic_since)}, seed {check.seed}",
            ratio("non-robust", nonrobust.value, nonrobust.ci_low, nonrobust.ci_high)
            + f"  ({check.censored} censored)",
            ratio("flagged", flagged.value, flagged.ci_low, flagged.ci_high)
            + f"  ({'intervals overlap' if check.ratios_agree else 'intervals DO NOT overlap'})",
            f"flag             recall {maybe(check.recall)}  precision "
            f"{maybe(check.precision)}  FPR {maybe(check.false_positive_rate)}",
            f"consistency      Kendall τ {maybe(check.kendall_tau)}  AUROC {maybe(check.auroc)}",
            f"live gauge       {check.live_gauge:.3f} (robust fraction measured "
            f"{1 - nonrobust.value:.3f}, an upper bound of correct and robust)",
        ]
    )


def _bad_input(error: ConfigError) -> int:
    print(f"{PROG}: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, as_json = load_config(argv)
    except ConfigError as error:
        return _bad_input(error)
    if config.traffic is None:
        return _run(config, as_json)
    # Imported here, not at the top, so that `--help` answers without loading torch.
    from marginwatch.calibration.served_setup import models_to_check

    try:
        configs = models_to_check(config, _warn, as_json=as_json)
    except ConfigError as error:
        return _bad_input(error)
    # Without --model, each model with traffic in DIR in turn; the exit code is the worst.
    several = len(configs) > 1
    return max(
        [_run(each, as_json, each.resolved_model_name if several else "") for each in configs]
    )


def _note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr, flush=True)


def _run(config: CalibrationConfig, as_json: bool, model: str = "") -> int:
    """One calibration, or one model's traffic check; its exit code. Errors name `model`."""
    from marginwatch.calibration.job import CalibrationError, run
    from marginwatch.calibration.traffic_check import TrafficResult, run_traffic

    announce = None if as_json else functools.partial(_announce, notes=not config.quiet)
    prefix = f"{PROG}: {model}: " if model else f"{PROG}: "
    result: RunResult | TrafficResult
    try:
        if config.traffic is not None:
            result = run_traffic(config, _warn, announce, None if config.quiet else _note)
        else:
            result = run(config, on_preflight=announce)
    except ConfigError as error:
        print(f"{prefix}{error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except store.StoreBusy as error:
        print(f"{prefix}{error}; try again later", file=sys.stderr)
        return EXIT_BUSY
    except store.PublishIncomplete as error:  # the one failure after the store changed
        print(f"{prefix}failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (CalibrationError, store.ArtifactError, OSError) as error:
        print(f"{prefix}failed, store unchanged: {error}", file=sys.stderr)
        return EXIT_FAILED
    if isinstance(result, TrafficResult):
        _print_traffic_result(result, config, as_json)
    else:
        _print_result(result, config, as_json)
    return 0


def _print_traffic_result(result: TrafficResult, config: CalibrationConfig, as_json: bool) -> None:
    if as_json:
        check = result.check.model_dump(mode="json")
        refit = result.refit
        if refit is None or refit.record is None:
            print(json.dumps(check, indent=2))
        else:
            both = {"traffic_check": check, "calibration": refit.record.model_dump(mode="json")}
            print(json.dumps(both, indent=2))
        return
    print(_check_summary(result.check))
    print(f"published {os.path.relpath(result.check_path)} (CURRENT unchanged)")
    if result.refit is not None:
        _print_result(result.refit, config, as_json)


def _print_result(result: RunResult, config: CalibrationConfig, as_json: bool) -> None:
    if config.preflight_only:
        if not config.quiet:
            _notes(result.preflight)
        print(result.preflight.summary())
    elif result.record is None:
        print(f"shard {result.shard_done} of {config.num_shards} done")
    elif as_json:
        print(json.dumps(result.record.model_dump(mode="json"), indent=2))
    else:
        print(_summary(result.record))
        print(f"published {os.path.relpath(result.version_dir or '')}")


if __name__ == "__main__":
    sys.exit(main())
