"""A fixed set of instances, for tools and tests that know their targets' addresses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from ordermesh_shared.discovery import ServiceInstance


class StaticInstances:
    """Satisfies the client's :class:`~ordermesh_shared.resilience.client.InstanceSource`.

    >>> source = StaticInstances.from_urls({"payment": ["http://127.0.0.1:8002"]})
    >>> async with ServiceClient(source) as clients:
    ...     await clients.payment.get("/customers")
    """

    def __init__(self, instances: Mapping[str, Sequence[ServiceInstance]] | None = None) -> None:
        self._instances = {name: tuple(found) for name, found in (instances or {}).items()}

    @classmethod
    def from_urls(cls, urls: Mapping[str, Sequence[str]]) -> StaticInstances:
        """Instances named ``<service>-<n>`` from ``http://host:port`` URLs."""
        return cls(
            {
                name: [_instance(name, n, url) for n, url in enumerate(found, 1)]
                for name, found in urls.items()
            }
        )

    def set(self, service: str, instances: Sequence[ServiceInstance]) -> None:
        """Replace ``service``'s instances (a new snapshot, as a registry watch would give)."""
        self._instances[service] = tuple(instances)

    async def watch(self, service: str) -> None:
        """Nothing to watch: the set only changes through :meth:`set`."""

    def instances(self, service: str) -> Sequence[ServiceInstance]:
        return self._instances.get(service, ())


def _instance(service: str, n: int, url: str) -> ServiceInstance:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"expected http://host:port, got {url!r}")
    return ServiceInstance(service, f"{service}-{n}", parts.hostname, parts.port)
