"""`marginwatch-serve`: run the service in one uvicorn process (scale with replicas).

Every field of `Settings` is an option here, written from the field itself (flag, help text,
default), so the command line cannot drift from the settings. Every option also has an
environment variable (prefix `MARGINWATCH_`, see `settings.py`); an option given here wins over
its variable, and the variable over the default.

uvicorn runs with its usual event loop (uvloop) and HTTP parser (httptools), through its `Server`
rather than `uvicorn.run`: the listening socket is bound here, so that the HTTP protocol
(`protocol.py`: read time-outs, eager accepting) can accept every connection waiting on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Collection, Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE

from marginwatch.artifact import cli_settings
from marginwatch.service.app import create_app
from marginwatch.service.protocol import timed_protocol
from marginwatch.service.runtime import tune_garbage_collector, tune_thread_switching
from marginwatch.service.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


REDACTED = "[redacted]"
# A query parameter that carries a credential by its name, whatever its value: a key that is not
# (or no longer) configured is a secret too
_CREDENTIAL_PARAMETER = re.compile(
    r"(?i)([?&](?:api[_-]?key|x-api-key|key|token|access[_-]?token|auth(?:orization)?)=)[^&\s\"']*"
)


class RedactKeys(logging.Filter):
    """Removes API keys from every log line: the configured keys wherever they appear, and the
    value of any credential-named query parameter (uvicorn's access log writes the path with
    its query string, where a client may have put its key)."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        super().__init__()
        self._keys = [key for key in keys if key]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _CREDENTIAL_PARAMETER.sub(rf"\g<1>{REDACTED}", message)
        for key in self._keys:
            redacted = redacted.replace(key, REDACTED)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def log_config(log_format: str, level: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """A logging configuration for uvicorn's loggers and ours, in text or JSON, with `keys`
    (and any credential in a query string) redacted from every line."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    loggers = ("uvicorn", "uvicorn.error", "uvicorn.access", "marginwatch")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "filters": {"redact": {"()": RedactKeys, "keys": list(keys)}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
            for name in loggers
        },
    }


def build_parser() -> argparse.ArgumentParser:
    """One flag per `Settings` field, written from the field (`artifact.cli_settings`):
    `--max-batch-size` for `max_batch_size`, its description, its environment variable and its
    default."""
    parser = argparse.ArgumentParser(
        prog="marginwatch-serve",
        description="Serve calibrated classifiers over HTTP (own REST API under /v1, the Open "
        "Inference Protocol under /v2, Prometheus metrics on /metrics, OpenAPI on /docs). "
        "Each option overrides its MARGINWATCH_* environment variable, which overrides the "
        "default.",
    )
    cli_settings.add_options(parser, Settings)
    return parser


def settings_from(argv: list[str] | None) -> Settings:
    """The settings: a flag given here, else its environment variable, else the default."""
    return Settings(**settings_given(argv))


def settings_given(argv: list[str] | None) -> dict[str, Any]:
    """The settings given as flags (`artifact.cli_settings`: a flag not given is absent)."""
    return cli_settings.given_values(build_parser().parse_args(argv), Settings)


def settings_problems(error: ValidationError, given: Collection[str] = ()) -> str:
    """One line per problem, naming the flag or variable it came from but never the value: a
    value may be a secret (an API key), and pydantic's own text of the error quotes the input."""
    found = cli_settings.problems(error, Settings, given, quote=False)
    return "\n".join(f"  {problem}" for problem in found)


def main(argv: list[str] | None = None) -> int:
    given = settings_given(argv)
    try:
        settings = Settings(**given)
    except ValidationError as error:
        problems = settings_problems(error, given)
        print(f"marginwatch-serve: invalid settings:\n{problems}", file=sys.stderr)
        return 2
    app = create_app(settings)
    tune_garbage_collector()
    tune_thread_switching()
    protocol = timed_protocol(settings.read_timeout_s)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        http=protocol,
        log_config=log_config(
            settings.log_format,
            settings.log_level,
            [key.get_secret_value() for key in settings.api_keys],
        ),
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        server_header=False,
    )
    server = uvicorn.Server(config)
    protocol.listener = config.bind_socket()  # logs "Uvicorn running on ..."
    server.run(sockets=[protocol.listener])
    # as uvicorn.run: a server stopped before it started (a signal during start-up) failed
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
