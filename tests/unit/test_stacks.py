"""Which stack the tools act on, and where they find its parts: no Docker, no servers.

The compose side is read from ``docker inspect`` objects shaped like the engine's own
(trimmed to the fields used), so these check what a person sees: the stack picked, the
sentence when none runs, every replica's URL, the secrets the stack was started with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ordermesh_deploy.local import Stack
from ordermesh_deploy.stacks import (
    ComposeEndpoints,
    Kind,
    LocalEndpoints,
    StackError,
    choose,
    parse_container,
    scale_flags,
    up_arguments,
)


def inspected(
    service: str,
    number: int = 1,
    *,
    status: str = "running",
    health: str | None = "healthy",
    ports: dict[int, int] | None = None,
    env: dict[str, str] | None = None,
    address: str = "172.20.0.9",
    oneoff: bool = False,
) -> dict[str, Any]:
    """One object of `docker inspect`, as docker-compose 1.29 labels its containers."""
    labels = {
        "com.docker.compose.project": "ordermesh",
        "com.docker.compose.service": service,
        "com.docker.compose.container-number": str(number),
        "com.docker.compose.oneoff": "True" if oneoff else "False",
    }
    state: dict[str, Any] = {"Status": status, "Running": status in ("running", "paused")}
    if health:
        state["Health"] = {"Status": health, "FailingStreak": 0}
    bindings = {
        f"{inner}/tcp": [
            {"HostIp": "0.0.0.0", "HostPort": str(outer)},
            {"HostIp": "::", "HostPort": str(outer)},
        ]
        for inner, outer in (ports or {}).items()
    }
    return {
        "Id": f"{service}{number}".ljust(64, "0"),
        "Config": {"Labels": labels, "Env": [f"{k}={v}" for k, v in (env or {}).items()]},
        "State": state,
        "NetworkSettings": {
            "Ports": bindings | {"2380/tcp": None},
            "Networks": {
                "ordermesh_default": {
                    "Aliases": [service, f"{service}{number}"[:12]],
                    "IPAddress": address,
                }
            },
        },
    }


def compose_stack(*infos: dict[str, Any], dotenv: dict[str, str] | None = None) -> ComposeEndpoints:
    containers = [c for c in map(parse_container, infos) if c is not None]
    return ComposeEndpoints(containers, dotenv or {})


SCALED = (
    inspected("order", ports={8000: 8000}, env={"ADMIN_TOKEN": "from-the-container"}),
    inspected("payment", 1, ports={8000: 32801}),
    inspected("payment", 2, ports={8000: 32802}),
    inspected("payment", 3, ports={8000: 32803}, status="paused", health="healthy"),
    inspected("postgres", ports={5432: 32790}, env={"AUDIT_DB_PASSWORD": "s3cr/t"}),
    inspected("rabbitmq", ports={5672: 32791, 15672: 15672}),
    inspected("etcd", ports={2379: 32792}),
)


# --- which stack ------------------------------------------------------------------------------


def test_with_nothing_running_the_tools_say_how_to_start_either_stack() -> None:
    with pytest.raises(StackError) as raised:
        choose(None, local_running=False, compose_running=False)
    assert str(raised.value) == (
        "no stack is running: start one with `make dev` (local processes)"
        " or `make up` (docker compose)"
    )


@pytest.mark.parametrize(
    ("local_running", "compose_running", "found"),
    [(True, False, "local"), (False, True, "compose"), (True, True, "local")],
)
def test_the_running_stack_is_found_the_local_one_first(
    local_running: bool, compose_running: bool, found: str
) -> None:
    assert choose(None, local_running=local_running, compose_running=compose_running) == found


def test_an_explicit_target_wins_over_the_running_local_stack() -> None:
    assert choose("compose", local_running=True, compose_running=True) == "compose"


@pytest.mark.parametrize(("target", "start"), [("compose", "`make up`"), ("local", "`make dev`")])
def test_a_named_stack_that_is_not_running_is_named_with_its_start_command(
    target: Kind, start: str
) -> None:
    # Only the other stack runs.
    with pytest.raises(StackError, match=f"the {target} stack is not running.*{start}"):
        choose(target, local_running=target == "compose", compose_running=target == "local")


# --- where the compose stack's parts answer --------------------------------------------------


def test_every_payment_replica_has_its_own_url_by_compose_index() -> None:
    stack = compose_stack(*SCALED)
    assert stack.instances == {
        "order-1": "http://127.0.0.1:8000",
        "payment-1": "http://127.0.0.1:32801",
        "payment-2": "http://127.0.0.1:32802",
        # Paused: it keeps its port (chaos resumes it by that name).
        "payment-3": "http://127.0.0.1:32803",
    }
    assert stack.order_url == "http://127.0.0.1:8000"


def test_a_stopped_replica_has_no_url_and_one_off_containers_are_not_replicas() -> None:
    stack = compose_stack(
        inspected("payment", 1, ports={8000: 32801}),
        inspected("payment", 2, status="exited", health="unhealthy"),
        inspected("payment", 3, ports={8000: 32899}, oneoff=True),
    )
    assert stack.instances == {"payment-1": "http://127.0.0.1:32801"}
    assert [c.name for c in stack.containers] == ["payment-1", "payment-2"]


def test_the_auditor_reads_compose_as_the_read_only_role_on_the_published_port() -> None:
    databases = compose_stack(*SCALED).databases
    assert databases["inventory"] == (
        "postgresql://ordermesh_audit:s3cr%2Ft@127.0.0.1:32790/ordermesh_inventory"
    )
    assert set(databases) == {"order", "inventory", "payment", "shipping"}


def test_the_event_tail_uses_the_admin_user_and_the_secret_from_dotenv() -> None:
    stack = compose_stack(*SCALED, dotenv={"RABBITMQ_ADMIN_PASSWORD": "pw"})
    assert stack.amqp_url == "amqp://admin:pw@127.0.0.1:32791/"
    assert stack.etcd_url == "http://127.0.0.1:32792"


def test_the_admin_token_is_the_one_the_services_were_started_with_never_a_default() -> None:
    stack = compose_stack(*SCALED, dotenv={"ADMIN_TOKEN": "stale-dotenv"})
    assert stack.admin_token == "from-the-container"
    without = compose_stack(inspected("order", ports={8000: 8000}))
    with pytest.raises(StackError, match=r"ADMIN_TOKEN is not in \.env"):
        _ = without.admin_token


def test_a_part_that_publishes_no_port_is_named() -> None:
    stack = compose_stack(
        inspected("order", ports={8000: 8000}), inspected("postgres", status="exited")
    )
    with pytest.raises(StackError, match="postgres publishes no port 5432"):
        _ = stack.databases


def test_reset_keeps_the_replica_counts_of_a_scaled_stack() -> None:
    assert scale_flags(compose_stack(*SCALED).containers) == ["payment=3"]


# --- the local stack -------------------------------------------------------------------------


def local_stack(run_dir: Path, **changes: Any) -> Stack:
    fields: dict[str, Any] = {
        "run_dir": str(run_dir),
        "postgres_url": "postgresql://ordermesh:pw@127.0.0.1:5432",
        "rabbitmq_url": "amqp://guest:guest@127.0.0.1:5672/",
        "etcd_url": "http://127.0.0.1:40001",
        "private_etcd": True,
        "instances": {"order-1": "http://127.0.0.1:8000", "payment-1": "http://127.0.0.1:8002"},
    }
    return Stack(**(fields | changes))


def test_the_local_stack_gives_its_databases_broker_and_never_a_default_token(
    tmp_path: Path,
) -> None:
    stack = LocalEndpoints(local_stack(tmp_path, db_prefix="om", rabbitmq_vhost="om"))
    assert stack.databases["payment"] == "postgresql://ordermesh:pw@127.0.0.1:5432/om_payment"
    assert stack.amqp_url == "amqp://guest:guest@127.0.0.1:5672/om"
    with pytest.raises(StackError, match="no ADMIN_TOKEN"):
        _ = stack.admin_token


def test_the_local_admin_token_is_the_one_make_dev_passed_on(tmp_path: Path) -> None:
    (tmp_path / "supervisord.conf").write_text(
        '[program:payment-1]\nenvironment=HOST="127.0.0.1",ADMIN_TOKEN="t0ken",PORT="8002"\n'
    )
    assert LocalEndpoints(local_stack(tmp_path)).admin_token == "t0ken"


def test_a_local_reset_starts_the_stack_again_with_the_same_shape(tmp_path: Path) -> None:
    instances = {
        "order-1": "http://127.0.0.1:20000",
        "payment-1": "http://127.0.0.1:20002",
        "payment-2": "http://127.0.0.1:20012",
    }
    stack = local_stack(
        tmp_path,
        instances=instances,
        db_prefix="om_e2e",
        rabbitmq_vhost="om_e2e",
        private_etcd=False,
        etcd_url="http://127.0.0.1:2379",
    )
    argv = up_arguments(stack)
    assert argv[:3] == ["--run-dir", str(tmp_path), "up"]
    pairs = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert pairs == {
        "--postgres-url": "postgresql://ordermesh:pw@127.0.0.1:5432",
        "--rabbitmq-url": "amqp://guest:guest@127.0.0.1:5672/",
        "--db-prefix": "om_e2e",
        "--rabbitmq-vhost": "om_e2e",
        "--etcd-url": "http://127.0.0.1:2379",
        "--scale": "payment=2",
        "--port-offset": "12000",
    }
