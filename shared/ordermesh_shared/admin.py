"""Admin endpoints' guard: the ``X-Admin-Token`` header must match ``ADMIN_TOKEN``.

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
    403: {"description": f"Wrong {ADMIN_TOKEN_HEADER}."},
}


def check_admin_token(given: str | None, expected: SecretStr) -> None:
    """401 without a token, 403 with a wrong one (compared in constant time)."""
    if not given:
        raise HTTPException(401, f"admin endpoint: send the {ADMIN_TOKEN_HEADER} header")
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, f"admin endpoint: wrong {ADMIN_TOKEN_HEADER}")


async def require_admin(  # async: no worker-thread hop (see bootstrap.get_context)
    request: Request,
    token: Annotated[str | None, Header(alias=ADMIN_TOKEN_HEADER)] = None,
) -> None:
    """FastAPI dependency guarding an admin route with the running service's token."""
    check_admin_token(token, request.app.state.ctx.settings.admin_token)


RequireAdmin = Depends(require_admin)
