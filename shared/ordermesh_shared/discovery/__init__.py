"""Service discovery: the :class:`Registry` port and its etcd, Consul and DNS backends."""

from ordermesh_shared.discovery.base import Registry, RegistryError, ServiceInstance

__all__ = ["Registry", "RegistryError", "ServiceInstance"]
