"""EtcdRegistry against real etcd: what peers see as instances come, go, crash and stall."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from ordermesh_shared.discovery import Registry, RegistryError, ServiceInstance
from ordermesh_shared.discovery.etcd import EtcdRegistry

from tests.support.etcd import EtcdServer, free_port
from tests.support.procs import ChildProcess, python_child

pytestmark = pytest.mark.integration

CHILD_TTL = 2.0

# A service's registration loop in miniature: it calls register every 0.2 s while "ready".
REGISTERING_CHILD = """
import asyncio, sys
from ordermesh_shared.discovery import RegistryError, ServiceInstance
from ordermesh_shared.discovery.etcd import EtcdRegistry

async def main(url, prefix, instance_id, ttl):
    me = ServiceInstance(service="payment", instance_id=instance_id, host="127.0.0.1", port=9100)
    async with EtcdRegistry(url, ttl=float(ttl), prefix=prefix) as registry:
        while True:
            try:
                await registry.register(me)
                print("registered", flush=True)
            except RegistryError as exc:
                print("register failed:", exc, flush=True)
            await asyncio.sleep(0.2)

asyncio.run(main(*sys.argv[1:]))
"""


def payment(n: int, *, port: int | None = None) -> ServiceInstance:
    port = port if port is not None else 9000 + n
    return ServiceInstance("payment", f"payment-{n}", "127.0.0.1", port, {"zone": "a"})


async def eventually(check: Callable[[], bool], *, within: float, what: str) -> float:
    """Poll ``check`` until it holds; returns how long that took."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


def ids(registry: Registry) -> list[str]:
    return [i.instance_id for i in registry.instances("payment")]


class Heartbeat:
    """Calls register for each instance every 0.2 s, ignoring failures, as a service does."""

    def __init__(self, registry: Registry, *instances: ServiceInstance) -> None:
        self.registry = registry
        self.instances = list(instances)

    async def run(self) -> None:
        while True:
            for instance in self.instances:
                with contextlib.suppress(RegistryError):  # etcd is down: the next beat retries
                    await self.registry.register(instance)
            await asyncio.sleep(0.2)


@pytest.fixture
def make_registry(shared_etcd: EtcdServer, etcd_prefix: str) -> Callable[..., EtcdRegistry]:
    def make(url: str | None = None, *, ttl: float = 2.0) -> EtcdRegistry:
        return EtcdRegistry(url or shared_etcd.url, ttl=ttl, prefix=etcd_prefix)

    return make


@pytest.fixture
async def watcher(make_registry: Callable[..., EtcdRegistry]) -> AsyncIterator[Registry]:
    async with make_registry() as registry:
        await registry.watch("payment")
        yield registry


@pytest.fixture
def registering_child(
    shared_etcd: EtcdServer, etcd_prefix: str, tmp_path: Path
) -> Iterator[ChildProcess]:
    args = (shared_etcd.url, etcd_prefix, "payment-child", str(CHILD_TTL))
    with python_child(REGISTERING_CHILD, *args, log_path=tmp_path / "child.log") as child:
        yield child


async def test_registered_instance_is_listed_by_a_new_watcher(
    make_registry: Callable[..., EtcdRegistry],
) -> None:
    async with make_registry() as ours, make_registry() as theirs:
        await ours.register(payment(1))
        await theirs.watch("payment")

        [seen] = theirs.instances("payment")

    assert seen == payment(1)
    assert seen.meta == {"zone": "a"}
    assert seen.base_url == "http://127.0.0.1:9001"


async def test_watcher_sees_instances_registered_later(
    make_registry: Callable[..., EtcdRegistry], watcher: Registry
) -> None:
    assert ids(watcher) == []
    async with make_registry() as ours:
        await ours.register(payment(1))
        await eventually(lambda: ids(watcher) == ["payment-1"], within=1, what="first instance")
        await ours.register(payment(2))
        await eventually(
            lambda: ids(watcher) == ["payment-1", "payment-2"], within=1, what="second instance"
        )


async def test_reregistering_with_a_new_address_updates_watchers(
    make_registry: Callable[..., EtcdRegistry], watcher: Registry
) -> None:
    async with make_registry() as ours:
        await ours.register(payment(1, port=9001))
        await ours.register(payment(1, port=9999))

        await eventually(
            lambda: [i.port for i in watcher.instances("payment")] == [9999],
            within=1,
            what="new port seen",
        )


async def test_deregister_removes_instance_from_watchers_at_once(
    make_registry: Callable[..., EtcdRegistry], watcher: Registry
) -> None:
    async with make_registry() as ours:
        await ours.register(payment(1))
        await ours.register(payment(2))
        await eventually(lambda: len(ids(watcher)) == 2, within=1, what="both registered")

        await ours.deregister(payment(1))
        elapsed = await eventually(
            lambda: ids(watcher) == ["payment-2"], within=1, what="payment-1 withdrawn"
        )

    assert elapsed < 1


async def test_leaving_the_registry_withdraws_its_instances_and_stops_its_tasks(
    make_registry: Callable[..., EtcdRegistry], watcher: Registry
) -> None:
    tasks_before = asyncio.all_tasks()
    async with make_registry() as ours:
        await ours.register(payment(1))
        await ours.watch("payment")
        await eventually(lambda: ids(watcher) == ["payment-1"], within=1, what="registered")

    await eventually(lambda: ids(watcher) == [], within=1, what="withdrawn on exit")
    assert asyncio.all_tasks() == tasks_before


async def test_registering_again_while_healthy_does_not_touch_etcd(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    async with EtcdRegistry(etcd_server.url, prefix=etcd_prefix) as ours:
        await ours.register(payment(1))
        etcd_server.pause()  # any request would now hang until resumed
        try:
            async with asyncio.timeout(0.2):  # so services can call it every second for free
                await ours.register(payment(1))
        finally:
            etcd_server.resume()


async def test_unwatched_service_has_no_instances(watcher: Registry) -> None:
    assert watcher.instances("shipping") == ()


async def test_sigkilled_instance_disappears_within_ttl(
    registering_child: ChildProcess, watcher: Registry
) -> None:
    await registering_child.wait_for_output("registered", timeout=10)
    await eventually(lambda: ids(watcher) == ["payment-child"], within=1, what="child registered")

    registering_child.kill()
    elapsed = await eventually(
        lambda: ids(watcher) == [], within=CHILD_TTL + 1, what="killed child expired"
    )

    assert elapsed > 0.2  # it expired; nobody withdrew it
    assert "Traceback" not in registering_child.output()


async def test_instance_paused_past_its_ttl_comes_back_when_resumed(
    registering_child: ChildProcess, watcher: Registry
) -> None:
    await registering_child.wait_for_output("registered", timeout=10)
    await eventually(lambda: ids(watcher) == ["payment-child"], within=1, what="child registered")

    registering_child.pause()  # a long GC pause or VM stall: keepalives stop, the lease expires
    await eventually(lambda: ids(watcher) == [], within=CHILD_TTL + 1, what="paused child expired")
    registering_child.resume()

    await eventually(
        lambda: ids(watcher) == ["payment-child"], within=CHILD_TTL, what="child re-registered"
    )
    assert "Traceback" not in registering_child.output()


async def test_registration_and_watch_recover_after_etcd_restart(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    ours = EtcdRegistry(etcd_server.url, ttl=1.0, prefix=etcd_prefix)
    theirs = EtcdRegistry(etcd_server.url, ttl=1.0, prefix=etcd_prefix)
    async with ours, theirs, asyncio.TaskGroup() as tasks:
        heartbeat = Heartbeat(ours, payment(1))
        beating = tasks.create_task(heartbeat.run())
        await theirs.watch("payment")
        await eventually(lambda: ids(theirs) == ["payment-1"], within=1, what="registered")

        etcd_server.kill()
        await asyncio.sleep(1.5)  # longer than the TTL, while the heartbeat keeps calling
        etcd_server.start()
        heartbeat.instances.append(payment(2))  # proves the watch follows changes again

        await eventually(
            lambda: ids(theirs) == ["payment-1", "payment-2"], within=5, what="cache recovered"
        )
        await asyncio.sleep(2)  # two TTLs: the first registration is still being kept alive
        assert ids(theirs) == ["payment-1", "payment-2"]
        beating.cancel()


async def test_registration_heals_when_etcd_comes_back_without_its_data(
    etcd_server: EtcdServer, etcd_prefix: str
) -> None:
    ours = EtcdRegistry(etcd_server.url, ttl=1.0, prefix=etcd_prefix)
    theirs = EtcdRegistry(etcd_server.url, ttl=1.0, prefix=etcd_prefix)
    async with ours, theirs, asyncio.TaskGroup() as tasks:
        beating = tasks.create_task(Heartbeat(ours, payment(1)).run())
        await theirs.watch("payment")
        await eventually(lambda: ids(theirs) == ["payment-1"], within=1, what="registered")

        etcd_server.kill()
        etcd_server.wipe()  # e.g. an etcd container without a volume: every lease is gone
        etcd_server.start()

        await eventually(lambda: ids(theirs) == [], within=5, what="re-listed the empty etcd")
        await eventually(lambda: ids(theirs) == ["payment-1"], within=3, what="registration healed")
        beating.cancel()


async def test_ping_raises_registry_error_naming_etcd_when_down(etcd_server: EtcdServer) -> None:
    async with EtcdRegistry(etcd_server.url) as registry:
        await registry.ping()
        etcd_server.kill()

        with pytest.raises(RegistryError, match=f"{etcd_server.url}.*running"):
            await registry.ping()


async def test_register_and_watch_raise_registry_error_without_etcd() -> None:
    async with EtcdRegistry(f"http://127.0.0.1:{free_port()}", timeout=0.5) as registry:
        with pytest.raises(RegistryError, match="cannot reach etcd"):
            await registry.register(payment(1))
        with pytest.raises(RegistryError, match="cannot reach etcd"):
            await registry.watch("payment")

        assert registry.instances("payment") == ()
