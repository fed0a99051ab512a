"""Hand-written fakes for unit tests (no network)."""

from __future__ import annotations

from collections.abc import Sequence

from ordermesh_shared.discovery import RegistryError, ServiceInstance


class InMemoryRegistry:
    """A registry in a dict; satisfies the ``Registry`` protocol without I/O."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, ServiceInstance]] = {}
        self.reachable = True
        self.register_calls = 0

    async def __aenter__(self) -> InMemoryRegistry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def register(self, instance: ServiceInstance) -> None:
        self._require_reachable()
        self.register_calls += 1
        self.entries.setdefault(instance.service, {})[instance.instance_id] = instance

    async def deregister(self, instance: ServiceInstance) -> None:
        self._require_reachable()
        self.entries.get(instance.service, {}).pop(instance.instance_id, None)

    async def watch(self, service: str) -> None:
        self._require_reachable()

    def instances(self, service: str) -> Sequence[ServiceInstance]:
        return tuple(self.entries.get(service, {}).values())

    async def ping(self) -> None:
        self._require_reachable()

    def _require_reachable(self) -> None:
        if not self.reachable:
            raise RegistryError("in-memory registry switched off by the test")
