"""Service tokens: who is calling, proven by a short-lived HS256 JWT signed with the deployment's
``SERVICE_TOKEN_SECRET``.

Every internal call carries ``Authorization: Bearer <token>`` whose claims name the caller
(``sub``), the callee (``aud``), when it was issued (``iat``) and when it expires (``exp``,
60 s later). The caller's :class:`ServiceTokens` signs one token per audience and reuses it
until shortly before it expires (one signature a minute per target, not one per call);
:class:`~ordermesh_shared.resilience.ServiceClient` attaches it, so services never build the
header themselves. A callee guards a route with :data:`ServiceCaller`: no token is 401; a token
for another audience, expired, or not signed with this deployment's secret is 403.

>>> tokens = ServiceTokens(settings.service_token_secret, service="order")
>>> tokens.for_audience("payment")                       # cached, refreshed before expiry
>>> @router.post("/payments")
... async def charge(caller: ServiceCaller, ...) -> ...: ...   # caller == "order"
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import jwt
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

ALGORITHM = "HS256"
TOKEN_TTL = 60.0
# A cached token is replaced this long before it expires, so none arrives already stale.
REFRESH_MARGIN = 15.0
# Clock skew tolerated between hosts when checking exp and iat.
LEEWAY = 5.0
_VERIFIED_CACHE_SIZE = 1024
_REQUIRED_CLAIMS = ["sub", "aud", "exp", "iat"]

_DETAIL_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
SERVICE_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "No service token: internal endpoints accept only the platform's services.",
        "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
    },
    403: {
        "description": "The service token is for another service, expired or wrongly signed.",
        "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
    },
}


class TokenRejected(Exception):
    """A token that does not prove a caller to this service (answered 403)."""


class ServiceTokens:
    """Issues this service's tokens (cached per audience) and checks the ones it receives.

    >>> tokens = ServiceTokens(SecretStr(secret), service="inventory")
    >>> caller = tokens.verify(token)          # "order", or TokenRejected
    >>> tokens.for_audience("payment")         # a token inventory may send to payment
    """

    def __init__(
        self,
        secret: SecretStr,
        *,
        service: str,
        ttl: float = TOKEN_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self._key = secret.get_secret_value()
        self._ttl = ttl
        self._clock = clock
        self._issued: dict[str, tuple[str, float]] = {}  # audience -> (token, exp)
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (caller, exp)

    def for_audience(self, audience: str) -> str:
        """A token naming this service to ``audience``, valid for at least REFRESH_MARGIN s."""
        now = self._clock()
        cached = self._issued.get(audience)
        if cached is not None and cached[1] - now > min(REFRESH_MARGIN, self._ttl / 2):
            return cached[0]
        token = self.issue(audience, now=now, ttl=self._ttl)
        self._issued[audience] = (token, now + self._ttl)
        return token

    def issue(self, audience: str, *, now: float, ttl: float) -> str:
        """A new token from this service to ``audience`` (``ttl`` may be negative in tests)."""
        claims = {"sub": self.service, "aud": audience, "iat": int(now), "exp": int(now + ttl)}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str) -> str:
        """The caller a token proves to this service; TokenRejected with the reason if none."""
        now = self._clock()
        seen = self._verified.get(token)
        if seen is not None and seen[1] + LEEWAY > now:
            return seen[0]  # this exact string was checked already: no second HMAC
        caller, expires = self._decode(token, now)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (caller, expires)
        return caller

    def _decode(self, token: str, now: float) -> tuple[str, float]:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self.service,
                # Expiry is checked below on this object's clock (the one its cache uses).
                options={"require": _REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            raise TokenRejected(f"service token is not for {self.service}") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("service token has a bad signature") from None
        except jwt.InvalidTokenError as exc:
            raise TokenRejected(f"invalid service token: {exc}") from None
        caller, expires = claims["sub"], claims["exp"]
        if not isinstance(caller, str) or not caller:
            raise TokenRejected("service token names no caller (sub)")
        if not isinstance(expires, int | float) or expires + LEEWAY <= now:
            raise TokenRejected("service token expired")
        return caller, float(expires)


_bearer = HTTPBearer(
    scheme_name="ServiceToken",
    bearerFormat="JWT",
    description=(
        "Internal calls only: an HS256 JWT signed with the deployment's SERVICE_TOKEN_SECRET,"
        " sub = calling service, aud = this service, exp within a minute."
    ),
    auto_error=False,
)


async def require_service_caller(  # async: no worker-thread hop (see bootstrap.get_context)
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """FastAPI dependency: the authenticated calling service's name (401/403 otherwise)."""
    if credentials is None:
        raise HTTPException(
            401,
            "internal endpoint: send Authorization: Bearer <service token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tokens: ServiceTokens = request.app.state.service_tokens
    try:
        return tokens.verify(credentials.credentials)
    except TokenRejected as exc:
        raise HTTPException(403, f"internal endpoint: {exc}") from None


async def optional_service_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """The calling service when a valid token came with the request, else None (never fails)."""
    if credentials is None:
        return None
    tokens: ServiceTokens = request.app.state.service_tokens
    try:
        return tokens.verify(credentials.credentials)
    except TokenRejected:
        return None


ServiceCaller = Annotated[str, Depends(require_service_caller)]
MaybeServiceCaller = Annotated[str | None, Depends(optional_service_caller)]
