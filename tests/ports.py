"""A free TCP port on the loopback interface, for the tests that start a server (uvicorn, gRPC, a
container). tests/ is on sys.path (pytest's `pythonpath`), so every test module imports it as
`from ports import free_port`."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now; the server binds it a moment later (the usual race, which
    a test server that fails to bind reports at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
