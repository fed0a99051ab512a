"""Admin endpoints' guard: the ``X-Admin-Token`` header must match ``ADMIN_TOKEN``.

There is no default token: an instance started without ``ADMIN_TOKEN`` has its admin
endpoints disabled (403 saying so).

>>> @router.post("/orders/{order_id}/retry", dependencies=[RequireAdmin])
... async def retry(...): ...
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from pydantic import SecretStr

ADMIN_TOKEN_HEADER = "X-Admin-Token"

ADMIN_RESPONSES: dict[int | str, dict[str, str]] = {
    401: {"description": f"No {ADMIN_TOKEN_HEADER} header."},
    403: {"description": f"Wrong {ADMIN_TOKEN_HEADER}, or admin disabled (no ADMIN_TOKEN set)."},
}


def check_admin_token(given: str | None, expected: SecretStr | None) -> None:
    """403 when no token is configured, 401 without a token, 403 with a wrong one (compared
    in constant time)."""
    if expected is None or not expected.get_secret_value():
        raise HTTPException(403, "admin endpoints are disabled: ADMIN_TOKEN is not set")
    if not given:
        raise HTTPException(401, f"admin endpoint: send the {ADMIN_TOKEN_HEADER} header")
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, f"admin endpoint: wrong {ADMIN_TOKEN_HEADER}")


async def optional_admin(
    request: Request,
    token: Annotated[str | None, Header(alias=ADMIN_TOKEN_HEADER)] = None,
) -> bool:
    """FastAPI dependency: whether the request carries the right admin token (never fails)."""
    expected: SecretStr | None = request.app.state.ctx.settings.admin_token
    if not token or expected is None or not expected.get_secret_value():
        return False
    return secrets.compare_digest(token.encode(), expected.get_secret_value().encode())


async def require_admin(  # async: no worker-thread hop (see bootstrap.get_context)
    request: Request,
    token: Annotated[str | None, Header(alias=ADMIN_TOKEN_HEADER)] = None,
) -> None:
    """FastAPI dependency guarding an admin route with the running service's token."""
    check_admin_token(token, request.app.state.ctx.settings.admin_token)


RequireAdmin = Depends(require_admin)
IsAdmin = Annotated[bool, Depends(optional_admin)]
