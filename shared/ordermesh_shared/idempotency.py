"""Idempotency keys: the ``Idempotency-Key`` header of a state-changing participant call, in
the namespace of the authenticated caller (:mod:`ordermesh_shared.commands` stores each
command's answer under it, with the effect).

Keys live in the namespace of the authenticated caller (:data:`IdempotencyKey` requires a
service token): a key is stored as ``<caller>/<key>``, so no other caller can read the answer
stored under a key, or occupy in advance the key a compensation will use.

>>> @router.post("/payments")
... async def charge(body: ChargeRequest, ctx: Ctx, key: IdempotencyKey, request: Request):
...     command = ChargeCustomer(body)
...     return await run_command(ctx.db, key, fingerprint(request, body), command)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header

from ordermesh_shared.auth import ServiceCaller
from ordermesh_shared.errors import ServiceError

KeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Makes the command safe to retry: a replay returns the first answer.",
        examples=["6f1c2a7e-3b0d-4a59-9a43-0c8f6c9a1d2e:reserve"],
    ),
]


@dataclass(frozen=True, slots=True)
class CallerKey:
    """An ``Idempotency-Key`` as sent, in the namespace of the service that sent it."""

    caller: str
    key: str

    @property
    def stored(self) -> str:
        """The key as stored: ``<caller>/<key>`` (service names hold no ``/``)."""
        return f"{self.caller}/{self.key}"


async def caller_key(caller: ServiceCaller, key: KeyHeader) -> CallerKey:
    """FastAPI dependency: the authenticated caller (401/403 first) and its key."""
    return CallerKey(caller, key)


# A state-changing participant endpoint takes this: it is authenticated by the same token.
IdempotencyKey = Annotated[CallerKey, Depends(caller_key)]


class KeyReused(ServiceError):
    """The key was used before with a different request (422)."""

    status_code = 422
