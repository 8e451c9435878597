"""Optional API key: `Authorization: Bearer <key>` on every route but /health."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from services.gateway.errors import AuthenticationError


def api_key_dependency(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode() if api_key else b""

    async def require_api_key(request: Request) -> None:
        if not expected:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing API key: send it as 'Authorization: Bearer <key>'")
        # Constant time: the comparison must not leak how much of a guess was right.
        if not hmac.compare_digest(token.strip().encode(), expected):
            raise AuthenticationError("incorrect API key provided")

    return require_api_key
