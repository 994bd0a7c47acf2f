"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant
time against every configured key. With no keys configured every request passes."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence

from pydantic import SecretStr
from starlette.requests import Request

from marginwatch.service.errors import Unauthorized

Check = Callable[[Request], Awaitable[None]]


def _presented_key(request: Request) -> bytes | None:
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip().encode()
    api_key = request.headers.get("x-api-key")
    return api_key.encode() if api_key else None


def api_key_check(keys: Sequence[SecretStr]) -> Check:
    """A FastAPI dependency that raises `Unauthorized` unless the request carries a known key."""
    accepted = [key.get_secret_value().encode() for key in keys]

    async def check(request: Request) -> None:
        if not accepted:
            return
        presented = _presented_key(request)
        if presented is None:
            raise Unauthorized(
                "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            )
        matches = [hmac.compare_digest(presented, key) for key in accepted]  # no early exit
        if not any(matches):
            raise Unauthorized("the API key is not accepted")

    return check
