"""etcd loses its data while Postgres keeps the relay's fence: readiness says so, and the
operator's re-base (``ordermesh-outbox rebase-fence``) lets events flow again.

A real inventory app (elected relay, real etcd, Postgres and RabbitMQ); etcd's data dir is
wiped while the app runs, as when an etcd volume is lost.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx
import pytest
from inventory.app import SPEC, InventorySettings
from ordermesh_deploy import outbox_admin
from ordermesh_shared.bootstrap import ServiceContext
from ordermesh_shared.coordination import Election, StaleToken, current_token, fence
from ordermesh_shared.database import SHARED_MIGRATIONS, Database
from ordermesh_shared.etcd_client import EtcdClient
from ordermesh_shared.messaging.broker import Broker
from ordermesh_shared.outbox import add_event, wiring
from ordermesh_shared.outbox.relay import OutboxRelay, RelaySettings

from tests.support.apps import anonymous, context_of, running, wait_ready
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.integration

TOKEN = "test-admin"
ADMIN = {"X-Admin-Token": TOKEN}
RESOURCE = "outbox-relay/inventory"
QUIET = 1.0  # seconds (the service's is 3 x the election TTL)


@pytest.fixture
def short_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wiring, "REBASE_QUIET", QUIET)


@asynccontextmanager
async def inventory(dsn: str, amqp_url: str, etcd_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = InventorySettings(
        database_url=dsn, rabbitmq_url=amqp_url, etcd_url=etcd_url, admin_token=TOKEN, port=18111
    )
    async with running(SPEC, settings) as client:
        await wait_ready(client)
        yield client


async def bind_queue(amqp_url: str) -> None:
    """Somewhere for inventory's events to go (an unroutable event counts as failed)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("ordermesh.events", "topic", durable=True)
        queue = await channel.declare_queue("inventory.rebase-watch", durable=True)
        await queue.bind(exchange, "inventory.#")


async def commit_event(ctx: ServiceContext) -> str:
    async with ctx.db.pool.acquire() as conn, conn.transaction():
        event_id = await add_event(
            conn, aggregate_type="check", aggregate_id="c-1", event_type="rebase_probe", payload={}
        )
    return str(event_id)


async def published(ctx: ServiceContext, event_id: str) -> bool:
    async with ctx.db.pool.acquire() as conn:
        sql = "SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1"
        return bool(await conn.fetchval(sql, event_id))


async def stored_token(ctx: ServiceContext) -> int | None:
    async with ctx.db.pool.acquire() as conn:
        return await current_token(conn, resource=RESOURCE)


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health/ready")
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


async def cli(client: httpx.AsyncClient, *, confirm: bool) -> tuple[int, str]:
    """``ordermesh-outbox rebase-fence`` against the in-process instance."""
    out = io.StringIO()
    async with anonymous(client) as admin:
        admin.headers.update(ADMIN)
        try:
            code = await outbox_admin.rebase_fence(admin, confirm=confirm, out=out)
        except outbox_admin.AdminCallFailed as exc:
            return 1, f"{out.getvalue()}refused: {exc}"
    return code, out.getvalue()


async def advance_revision(etcd_url: str, by: int) -> None:
    """Writes that lift etcd's revision, as a long-lived cluster's history would."""
    async with EtcdClient(etcd_url) as etcd:
        for n in range(by):
            await etcd.put(f"/history/{n}", "x")


async def relay_state(client: httpx.AsyncClient) -> str:
    _, body = await readiness(client)
    state: str = body["details"]["outbox_relay"]["state"]
    return state


async def test_relay_fenced_out_after_etcd_data_loss_comes_back_after_rebase(
    fresh_database: str, rabbit_vhost: str, etcd_server: EtcdServer, short_quiet: None
) -> None:
    await bind_queue(rabbit_vhost)
    await advance_revision(etcd_server.url, 40)
    async with inventory(fresh_database, rabbit_vhost, etcd_server.url) as client:
        ctx = context_of(client)
        before = await commit_event(ctx)
        await eventually(lambda: published(ctx, before))
        old_token = await stored_token(ctx)
        assert old_token is not None
        assert old_token > 40

        # etcd loses its data: revisions start again at 1, below the stored token.
        etcd_server.kill()
        etcd_server.wipe()
        etcd_server.start()
        await eventually(lambda: _is(relay_state(client), "fenced_out"))

        during = await commit_event(ctx)
        status, body = await readiness(client)
        assert status == 200  # HTTP work goes on: degraded, not withdrawn
        assert body["status"] == "degraded"
        detail = body["details"]["outbox_relay"]
        assert detail["stored_token"] == old_token
        assert detail["term_token"] < old_token
        assert detail["command"] == "ordermesh-outbox rebase-fence --service inventory"
        assert "fenced out" in body["checks"]["outbox_relay"]
        await asyncio.sleep(0.5)
        assert not await published(ctx, during)

        # The tool shows both tokens and changes nothing without the confirmation.
        code, text = await cli(client, confirm=False)
        assert code == 1
        assert f"stored token:    {old_token}" in text
        assert "--confirm-etcd-reset" in text
        assert await stored_token(ctx) == old_token

        # A write accepted with the old token just now: a relay of the old etcd may be live.
        async with ctx.db.pool.acquire() as conn, conn.transaction():
            await fence(conn, resource=RESOURCE, token=old_token)
        code, text = await cli(client, confirm=True)
        assert code == 1
        assert "may still be live" in text
        assert await stored_token(ctx) == old_token

        await asyncio.sleep(QUIET)
        code, text = await cli(client, confirm=True)
        assert code == 0, text
        rebased = await stored_token(ctx)
        assert rebased is not None
        assert rebased < old_token
        assert f"{old_token} -> {rebased}" in text

        await eventually(lambda: published(ctx, during))
        status, body = await readiness(client)
        assert (status, body["status"]) == (200, "ok")
        assert body["details"]["outbox_relay"]["state"] == "leading"
        assert body["details"]["outbox_relay"]["term_token"] == rebased
        after = await commit_event(ctx)
        await eventually(lambda: published(ctx, after))

        # The fence holds again: an older term of the new etcd is refused...
        with pytest.raises(StaleToken):
            async with ctx.db.pool.acquire() as conn, conn.transaction():
                await fence(conn, resource=RESOURCE, token=rebased - 1)
        # ...and there is nothing left to re-base.
        code, text = await cli(client, confirm=True)
        assert code == 1
        assert "nothing to fix" in text
        assert await stored_token(ctx) == rebased


async def test_rebase_needs_the_confirmation_and_the_admin_token(
    fresh_database: str, rabbit_vhost: str, etcd_server: EtcdServer
) -> None:
    await bind_queue(rabbit_vhost)
    async with inventory(fresh_database, rabbit_vhost, etcd_server.url) as client:
        await eventually(lambda: _is(relay_state(client), "leading"))
        unconfirmed = await client.post("/admin/outbox/fence/rebase", json={}, headers=ADMIN)
        assert unconfirmed.status_code == 400
        body = {"confirm_etcd_reset": True}
        assert (await client.post("/admin/outbox/fence/rebase", json=body)).status_code == 401
        nothing = await client.post("/admin/outbox/fence/rebase", json=body, headers=ADMIN)
        assert nothing.status_code == 409
        assert "nothing to fix" in nothing.json()["detail"]
        shown = (await client.get("/admin/outbox/fence", headers=ADMIN)).json()
        assert shown["etcd_behind"] is False
        assert shown["relay_here"]["state"] == "leading"


async def test_a_refused_leader_steps_down_in_the_end_and_a_later_term_gets_in(
    fresh_database: str, broker: Broker, etcd_server: EtcdServer
) -> None:
    """Without a re-base the old way out stays open: etcd's revision grows with every term,
    and once a new term's token passes the stored one it is let in."""
    settings = RelaySettings(poll_interval=0.1, fenced_hold=0.3, error_backoff_max=0.3)
    async with Database(fresh_database, max_size=4) as db, EtcdClient(etcd_server.url) as etcd:
        await db.migrate(SHARED_MIGRATIONS)
        _, revision = await etcd.get_prefix("/")
        async with db.pool.acquire() as conn, conn.transaction():
            await fence(conn, resource="outbox-relay/shop", token=revision + 6)
        relay = OutboxRelay(
            db, broker, service="shop", fence=wiring.relay_fence("shop"), settings=settings
        )
        election = Election(etcd, wiring.election_name("shop"), ttl=1.0, value="test")
        refused: set[int] = set()

        async def leading() -> bool:
            snapshot = await relay.status.as_json()
            if snapshot["state"] == "fenced_out":
                refused.add(snapshot["term_token"])
            return bool(snapshot["state"] == "leading")

        task = asyncio.create_task(relay.run(election))
        try:
            await eventually(leading, within=20)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert len(refused) >= 2  # terms were refused, each stepped down for a new token
        assert relay.status.state == "standby"  # cancelled: no longer leading


def test_cli_needs_a_service_and_asks_its_instances_in_order() -> None:
    parser = outbox_admin.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["rebase-fence", "--confirm-etcd-reset"])
    args = parser.parse_args(["rebase-fence", "--service", "order"])
    assert args.confirm_etcd_reset is False  # changing the fence is never the default
    instances = {"order-2": "http://b", "order-1": "http://a", "payment-1": "http://p"}
    assert outbox_admin.instance_urls(instances, "order") == ["http://a", "http://b"]


async def _is(state: Awaitable[str], wanted: str) -> bool:
    return await state == wanted
