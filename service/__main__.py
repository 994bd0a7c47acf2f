"""`marginwatch-serve`: run the service in one uvicorn process (scale with replicas).

Every option also has an environment variable (prefix `MARGINWATCH_`, see `settings.py`);
an option given here wins over its variable.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError

from marginwatch.service.app import create_app
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


def log_config(log_format: str, level: str) -> dict[str, Any]:
    """A logging configuration for uvicorn's loggers and ours, in text or JSON."""
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
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
            for name in loggers
        },
    }


def tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the request path.

    Requests in flight together keep thousands of small objects alive at once, which with the
    default gen-0 threshold (700) starts a collection every few requests, and the full ones walk
    every object the imports created: measured at concurrency 64, 22 % of the server's time
    (docs/benchmarks.md). Nearly everything a request allocates is freed by reference counting,
    so collections can be rare; what the imports made is moved out of the collector's sight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marginwatch-serve",
        description="Serve calibrated classifiers over HTTP (own REST API under /v1, the Open "
        "Inference Protocol under /v2, Prometheus metrics on /metrics, OpenAPI on /docs). "
        "Each option overrides its MARGINWATCH_* environment variable.",
    )
    parser.add_argument(
        "--host", help="interface to listen on (MARGINWATCH_HOST; default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, help="TCP port to listen on (MARGINWATCH_PORT; default 8000)"
    )
    parser.add_argument(
        "--store",
        help="artifact store folder: <store>/<model>/<version>/ and <store>/<model>/CURRENT "
        "(MARGINWATCH_STORE; default: the project's artifacts/ folder)",
    )
    parser.add_argument(
        "--models",
        help="comma-separated models to serve (MARGINWATCH_MODELS; default: every model in "
        "the store that has a CURRENT pointer)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines for people (text) or for a log collector (json) "
        "(MARGINWATCH_LOG_FORMAT; default text)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="lowest level logged (MARGINWATCH_LOG_LEVEL; default info)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        print(f"marginwatch-serve: invalid settings:\n{error}", file=sys.stderr)
        return 2
    app = create_app(settings)
    tune_garbage_collector()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=log_config(settings.log_format, settings.log_level),
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
