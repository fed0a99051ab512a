"""A faithful in-process double of the slice of Consul's HTTP API that ConsulRegistry uses.

There is no Consul binary on these machines, so the Consul backend is tested against this
double, written from Consul's API documentation and agent behaviour:

- ``PUT /v1/agent/service/register``: Name, ID (defaults to Name), Address, Port, Tags, Meta
  (validated like Consul: 64 pairs, ``[A-Za-z0-9_-]`` keys, no ``consul-`` prefix), ``Check``
  and ``Checks`` (HTTP only) with Interval, Timeout, DeregisterCriticalServiceAfter, Status.
  Keys match case-insensitively and in snake_case, as Consul's decoder does. A new check starts
  ``critical`` unless Status is given; re-registering keeps the status of a check with the same
  ID and bumps no index unless the definition changed. Check IDs default to
  ``service:<id>`` (``service:<id>:<n>`` when there are several).
- HTTP checks really run: a GET every Interval (the first after a random stagger within one
  interval), 2xx passing, 429 warning, anything else, an error or the Timeout critical. Only a
  status change is a catalog write (output-only changes are not, as in Consul).
- ``PUT /v1/agent/service/deregister/<id>``: 404 ``Unknown service ID`` when absent.
- ``GET /v1/agent/services`` and ``GET /v1/status/leader``.
- ``GET /v1/health/service/<name>`` with ``passing`` (all checks, node check included, must be
  passing), ``index`` and ``wait``: ``X-Consul-Index`` is the service's own index, or with no
  instance left the index of the last service extinction, never below 1. With ``index`` the
  query blocks until that index is exceeded or ``wait`` (default 5 min, at most 10) plus up to
  wait/16 of jitter elapses; a snapshot restore (:meth:`ConsulDouble.rewind`) or shutdown
  releases blocked queries at once, as Consul's abandon and shutdown channels do.
- The reaper: a service with a check critical for longer than its
  DeregisterCriticalServiceAfter is deregistered, checked every ``reap_interval``.
- The DNS interface (:class:`ConsulDns`, served over UDP and TCP by :class:`DnsServer`):
  ``<service>.service[.dc1].consul`` and the RFC 2782 ``_<service>._tcp.service.consul`` answer
  SRV (``1 1 <port> <target>``, the target's A record in the additional section) and A
  queries for the service's instances without a critical check (Consul's default
  ``only_passing = false``: warning still answers), shuffled, every record with the
  ``service_ttl`` (default 0 s, as Consul's). Over UDP an answer holds at most three records
  (``udp_answer_limit``, no TC bit), over TCP all. An unknown service, or one without a
  healthy instance, is NXDOMAIN with the ``consul.`` SOA; a name outside ``consul.`` is
  REFUSED (an agent without recursors).

Not modelled: ACLs and tokens, TTL/TCP/script/gRPC checks, ``tag``/``filter``/``near``,
the catalog and KV endpoints, sessions, several nodes or datacenters, anti-entropy delay,
hash-based blocking, consistency modes; in DNS, tags, node and prepared-query lookups, TXT
records, AAAA and recursion. Other paths answer 404.

Timing: Consul's floors (check interval >= 1 s, DeregisterCriticalServiceAfter >= 1 min,
reaper every 30 s) are the default :class:`Timing`. The ``consul_double`` fixture compresses
them (:data:`FAST_TIMING`) so the tests run in seconds; that is the one deliberate deviation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self, cast
from urllib.parse import parse_qs

import aiohttp
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
NODE, NODE_ADDRESS, DATACENTER = "consul-double", "127.0.0.1", "dc1"
NODE_INDEX = 5  # the node's own registration: the first catalog write of a fresh agent

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}
_JITTER_FRACTION = 16

Probe = Callable[[str], Awaitable[tuple[str, str]]]
"""``url -> (status, output)``: how a check run learns the instance's health."""


def go_duration(text: str) -> float:
    """Seconds in a Go duration (``"1s"``, ``"250ms"``, ``"1m30s"``), as ``time.ParseDuration``."""
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f'time: invalid duration "{text}"')
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


@dataclass(frozen=True)
class Timing:
    """The agent's time floors; the defaults are Consul's own."""

    min_check_interval: float = 1.0  # agent/checks.MinInterval
    min_deregister_after: float = 60.0  # documented minimum of DeregisterCriticalServiceAfter
    reap_interval: float = 30.0  # how often the agent reaps long-critical services
    default_check_timeout: float = 10.0
    default_wait: float = 300.0
    max_wait: float = 600.0


CONSUL_TIMING = Timing()
FAST_TIMING = Timing(min_check_interval=0.02, min_deregister_after=0.0, reap_interval=0.05)


@dataclass
class Check:
    """An HTTP check as the agent holds it (intervals already raised to the floors)."""

    check_id: str
    name: str
    service_id: str
    url: str
    interval: float
    timeout: float
    deregister_after: float | None
    definition: dict[str, Any]
    status: str = CRITICAL
    output: str = ""
    critical_since: float | None = None
    create_index: int = 0
    modify_index: int = 0

    def shape(self) -> tuple[Any, ...]:
        return self.check_id, self.name, self.url, self.definition


@dataclass
class Service:
    """A service instance registered with the agent."""

    service_id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    checks: dict[str, Check] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0

    def shape(self) -> tuple[Any, ...]:
        checks = sorted(check.shape() for check in self.checks.values())
        return self.name, self.address, self.port, self.tags, self.meta, checks


@dataclass(frozen=True)
class RecordedRequest:
    """One request the double received, for tests that pin what a client sends."""

    method: str
    path: str
    query: dict[str, list[str]]
    at: float


class _BadRequest(Exception):
    """Becomes a 400 with the message as a plain-text body, as Consul answers."""


def _fold(raw: Any, what: str) -> dict[str, Any]:
    """Keys as Consul's decoder matches them: case-insensitive, snake_case accepted."""
    if not isinstance(raw, dict):
        raise _BadRequest(f"Request decode failed: {what} must be a JSON object")
    return {str(key).lower().replace("_", ""): value for key, value in raw.items()}


def _duration(folded: Mapping[str, Any], key: str) -> float | None:
    raw = folded.get(key)
    if raw in (None, ""):
        return None
    if isinstance(raw, int | float):
        return float(raw) / 1e9  # a JSON number decodes into time.Duration as nanoseconds
    try:
        return go_duration(str(raw))
    except ValueError as exc:
        raise _BadRequest(f"Request decode failed: {exc}") from exc


def _valid_meta(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _BadRequest("Request decode failed: Meta must map strings to strings")
    if len(raw) > 64:
        raise _BadRequest("Invalid Service Meta: cannot contain more than 64 key/value pairs")
    for key, value in raw.items():
        if not _META_KEY.match(key) or key.startswith("consul-") or len(key) > 128:
            raise _BadRequest(f"Invalid Service Meta: Couldn't load metadata pair ('{key}')")
        if len(value) > 512:
            raise _BadRequest(f"Invalid Service Meta: value of '{key}' is too long (limit: 512)")
    return dict(raw)


def _bool_param(params: QueryParams, name: str) -> bool:
    if name not in params:
        return False
    value = params[name] or "true"  # a bare ?passing means true, as in Consul
    if value not in _GO_BOOLS:
        raise _BadRequest(f"Invalid value for ?{name}")
    return _GO_BOOLS[value]


def _status_for(code: int) -> str:
    if 200 <= code <= 299:
        return PASSING
    return WARNING if code == 429 else CRITICAL


class ConsulDouble:
    """The agent (with its single-node catalog) as an ASGI app plus a handle to drive it.

    >>> async with ConsulDouble(timing=FAST_TIMING) as agent:
    ...     client = httpx.AsyncClient(transport=httpx.ASGITransport(agent), base_url="http://c")
    ...     agent.check("payment-1").status   # inspect; agent.rewind(2) to drive
    """

    def __init__(self, *, timing: Timing = CONSUL_TIMING, probe: Probe | None = None) -> None:
        self.timing = timing
        self.leader: str | None = "127.0.0.1:8300"
        self.draining = False  # an agent shutting down answers blocking queries at once
        self.requests: list[RecordedRequest] = []
        self._probe = probe or self._http_probe
        self._services: dict[str, Service] = {}
        self._service_index: dict[str, int] = {}
        self._raft_index = NODE_INDEX
        self._extinction_index = 0
        self._forced_index: int | None = None
        self._changed = asyncio.Event()
        self._epoch = 0
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._app = Starlette(routes=self._routes())

    async def __aenter__(self) -> Self:
        # Consul's HTTP checks disable keep-alive: every run is a fresh connection.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self._reaper = asyncio.create_task(self._reap_forever(), name="consul-double-reaper")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.interrupt_blocking()
        tasks = [*self._runners.values(), *([self._reaper] if self._reaper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runners.clear()
        if self._session is not None:
            await self._session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = parse_qs(scope["query_string"].decode(), keep_blank_values=True)
            now = asyncio.get_running_loop().time()
            self.requests.append(RecordedRequest(scope["method"], scope["path"], query, now))
        await self._app(scope, receive, send)

    # -- inspect ----------------------------------------------------------------------------

    @property
    def service_ids(self) -> list[str]:
        """IDs of the services the agent holds now."""
        return sorted(self._services)

    def check(self, service_id: str) -> Check:
        """The (first) check of ``service_id``."""
        return next(iter(self._services[service_id].checks.values()))

    def index_of(self, name: str) -> int:
        """The ``X-Consul-Index`` a health query for ``name`` would answer now."""
        if self._forced_index is not None:
            return self._forced_index
        if name in self._service_index:
            return self._service_index[name]
        return max(self._extinction_index or self._raft_index, 1)

    def dns_instances(self, name: str) -> list[Service]:
        """The instances Consul's DNS answers for ``name``: those without a critical check."""
        return [
            service
            for service in self._services.values()
            if service.name == name and all(c.status != CRITICAL for c in service.checks.values())
        ]

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests whose path starts with ``path``."""
        return [r for r in self.requests if r.path.startswith(path)]

    # -- drive ------------------------------------------------------------------------------

    def force_index(self, index: int | None) -> None:
        """Answer this ``X-Consul-Index`` everywhere (``0`` plays a documented Consul bug)."""
        self._forced_index = index
        self._notify()

    def rewind(self, to: int) -> None:
        """Restore an older snapshot: indexes drop to at most ``to``, blocked queries return."""
        self._raft_index = to
        self._extinction_index = min(self._extinction_index, to)
        self._service_index = {name: min(i, to) for name, i in self._service_index.items()}
        for service in self._services.values():
            service.modify_index = min(service.modify_index, to)
            for check in service.checks.values():
                check.modify_index = min(check.modify_index, to)
        self.interrupt_blocking()

    def forget(self, service_id: str) -> None:
        """Lose a registration, as an agent whose state was wiped or that reaped it."""
        self._remove(service_id)

    def interrupt_blocking(self) -> None:
        """Release every blocked query with the current state (store abandoned or shutdown)."""
        self._epoch += 1
        self._notify()

    def reap_critical(self) -> list[str]:
        """Deregister services critical past their DeregisterCriticalServiceAfter; their IDs."""
        now = asyncio.get_running_loop().time()
        doomed = [sid for sid, svc in self._services.items() if self._overdue(svc, now)]
        for service_id in doomed:
            self._remove(service_id)
        return doomed

    # -- HTTP API ---------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        return [
            Route("/v1/agent/service/register", self._register, methods=["PUT"]),
            Route("/v1/agent/service/deregister/{sid:path}", self._deregister, methods=["PUT"]),
            Route("/v1/agent/services", self._agent_services, methods=["GET"]),
            Route("/v1/health/service/{name:path}", self._health_service, methods=["GET"]),
            Route("/v1/status/leader", self._status_leader, methods=["GET"]),
        ]

    async def _register(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            service = self._parse_service(body)
        except json.JSONDecodeError as exc:
            return PlainTextResponse(f"Request decode failed: {exc}", status_code=400)
        except _BadRequest as exc:
            return PlainTextResponse(str(exc), status_code=400)
        replace = request.query_params.get("replace-existing-checks") in ("", "true")
        self._apply(service, replace_checks=replace)
        return Response(status_code=200)

    async def _deregister(self, request: Request) -> Response:
        service_id = request.path_params["sid"]
        if service_id not in self._services:
            return PlainTextResponse(f'Unknown service ID "{service_id}"', status_code=404)
        self._remove(service_id)
        return Response(status_code=200)

    async def _agent_services(self, _request: Request) -> Response:
        return JSONResponse({sid: self._agent_json(s) for sid, s in self._services.items()})

    async def _status_leader(self, _request: Request) -> Response:
        return JSONResponse(self.leader or "")

    async def _health_service(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            passing = _bool_param(request.query_params, "passing")
            min_index, wait = self._blocking_params(request.query_params)
        except _BadRequest as exc:
            return PlainTextResponse(str(exc), status_code=400)
        if min_index > 0:
            await self._block(name, min_index, wait)
        entries = [self._health_json(s) for s in self._services.values() if s.name == name]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        headers = {"X-Consul-Index": str(self.index_of(name)), "X-Consul-KnownLeader": "true"}
        return JSONResponse(entries, headers=headers)

    def _blocking_params(self, params: QueryParams) -> tuple[int, float]:
        raw_index, raw_wait = params.get("index", ""), params.get("wait", "")
        if raw_index and not raw_index.isdigit():
            raise _BadRequest("Invalid index")
        try:
            wait = go_duration(raw_wait) if raw_wait else 0.0
        except ValueError as exc:
            raise _BadRequest("Invalid wait time") from exc
        wait = min(wait or self.timing.default_wait, self.timing.max_wait)
        return int(raw_index or 0), wait + random.uniform(0, wait / _JITTER_FRACTION)

    async def _block(self, name: str, min_index: int, wait: float) -> None:
        loop, epoch = asyncio.get_running_loop(), self._epoch
        deadline = loop.time() + wait
        while self.index_of(name) <= min_index and self._epoch == epoch and not self.draining:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    # -- registration -----------------------------------------------------------------------

    def _parse_service(self, raw: Any) -> Service:
        body = _fold(raw, "service definition")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _BadRequest("Missing service name")
        port = body.get("port") or 0
        if not isinstance(port, int):
            raise _BadRequest("Request decode failed: Port must be a number")
        service = Service(
            service_id=str(body.get("id") or name),
            name=name,
            address=str(body.get("address") or ""),
            port=port,
            tags=[str(tag) for tag in body.get("tags") or []],
            meta=_valid_meta(body.get("meta")),
        )
        raw_checks = ([body["check"]] if body.get("check") else []) + list(body.get("checks") or [])
        for position, raw_check in enumerate(raw_checks, start=1):
            number = position if len(raw_checks) > 1 else None
            check = self._parse_check(raw_check, service, number)
            service.checks[check.check_id] = check
        return service

    def _parse_check(self, raw: Any, service: Service, number: int | None) -> Check:
        spec = _fold(raw, "check")
        if not spec.get("http"):
            raise _BadRequest("consul double: only HTTP checks are modelled")
        interval = _duration(spec, "interval")
        if not interval or interval <= 0:
            raise _BadRequest(
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks"
            )
        status = spec.get("status") or CRITICAL
        if status not in (PASSING, WARNING, CRITICAL):
            raise _BadRequest("Status for checks must 'passing', 'warning', 'critical'")
        deregister_after = _duration(spec, "deregistercriticalserviceafter")
        default_id = f"service:{service.service_id}" + (f":{number}" if number else "")
        return Check(
            check_id=str(spec.get("checkid") or spec.get("id") or default_id),
            name=str(spec.get("name") or f"Service '{service.name}' check"),
            service_id=service.service_id,
            url=str(spec["http"]),
            interval=max(interval, self.timing.min_check_interval),
            timeout=_duration(spec, "timeout") or self.timing.default_check_timeout,
            deregister_after=(
                max(deregister_after, self.timing.min_deregister_after)
                if deregister_after
                else None
            ),
            definition=self._definition(spec),
            status=status,
        )

    @staticmethod
    def _definition(spec: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "Interval": str(spec.get("interval") or ""),
            "Timeout": str(spec.get("timeout") or ""),
            "DeregisterCriticalServiceAfter": str(spec.get("deregistercriticalserviceafter") or ""),
            "HTTP": str(spec["http"]),
            "Header": spec.get("header"),
            "Method": str(spec.get("method") or ""),
            "Body": "",
            "TLSServerName": "",
            "TLSSkipVerify": False,
            "TCP": "",
        }

    def _apply(self, new: Service, *, replace_checks: bool) -> None:
        old = self._services.get(new.service_id)
        if old is not None and old.name != new.name:
            self._remove(old.service_id)  # an ID reused under another name is a new service
            old = None
        if old is not None:
            self._carry_over(old, new, replace_checks=replace_checks)
        for check_id in old.checks if old else ():
            self._stop_runner(check_id)
        self._services[new.service_id] = new
        for check in new.checks.values():
            self._start_runner(check)
        if old is not None and old.shape() == new.shape():
            return  # an idempotent re-registration is no catalog write: no index moves
        index = self._write(new.name)
        new.create_index = old.create_index if old else index
        new.modify_index = index
        for check in new.checks.values():
            check.create_index = check.create_index or index
            check.modify_index = index

    @staticmethod
    def _carry_over(old: Service, new: Service, *, replace_checks: bool) -> None:
        for check_id, previous in old.checks.items():
            if check_id in new.checks:
                # Consul restores a re-registered check's status and output from its snapshot.
                current = new.checks[check_id]
                current.status, current.output = previous.status, previous.output
                current.create_index, current.modify_index = (
                    previous.create_index,
                    previous.modify_index,
                )
            elif not replace_checks:
                new.checks[check_id] = previous
        new.create_index, new.modify_index = old.create_index, old.modify_index

    def _remove(self, service_id: str) -> None:
        service = self._services.pop(service_id)
        for check_id in service.checks:
            self._stop_runner(check_id)
        self._write(service.name)

    def _write(self, name: str) -> int:
        """One catalog write touching ``name``: the raft index moves, blocked queries wake."""
        self._raft_index += 1
        if any(s.name == name for s in self._services.values()):
            self._service_index[name] = self._raft_index
        else:
            self._service_index.pop(name, None)
            self._extinction_index = self._raft_index
        self._notify()
        return self._raft_index

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- checks -----------------------------------------------------------------------------

    def _start_runner(self, check: Check) -> None:
        task = asyncio.create_task(self._run_check(check), name=f"check-{check.check_id}")
        self._runners[check.check_id] = task

    def _stop_runner(self, check_id: str) -> None:
        task = self._runners.pop(check_id, None)
        if task is not None:
            task.cancel()

    async def _run_check(self, check: Check) -> None:
        await asyncio.sleep(random.uniform(0, check.interval))  # Consul staggers first runs
        while True:
            try:
                async with asyncio.timeout(check.timeout):
                    status, output = await self._probe(check.url)
            except TimeoutError:
                status = CRITICAL
                output = f"Get {check.url!r}: context deadline exceeded (Client.Timeout exceeded)"
            self._record(check, status, output)
            await asyncio.sleep(check.interval)

    def _record(self, check: Check, status: str, output: str) -> None:
        now = asyncio.get_running_loop().time()
        if status != CRITICAL:
            check.critical_since = None
        elif check.critical_since is None:
            check.critical_since = now
        check.output = output
        if status != check.status:
            check.status = status
            check.modify_index = self._write(self._services[check.service_id].name)

    async def _http_probe(self, url: str) -> tuple[str, str]:
        assert self._session is not None, "use ConsulDouble inside 'async with'"
        headers = {"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"}
        try:
            async with self._session.get(url, headers=headers) as response:
                body = (await response.content.read(4096)).decode(errors="replace")
        except aiohttp.ClientError as exc:
            return CRITICAL, f"Get {url!r}: {exc}"
        output = f"HTTP GET {url}: {response.status} {response.reason} Output: {body}"
        return _status_for(response.status), output

    def _overdue(self, service: Service, now: float) -> bool:
        return any(
            check.deregister_after is not None
            and check.critical_since is not None
            and now - check.critical_since > check.deregister_after
            for check in service.checks.values()
        )

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.timing.reap_interval)
            self.reap_critical()

    # -- JSON shapes (as Consul renders them) -----------------------------------------------

    def _agent_json(self, service: Service) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Meta": dict(service.meta),
            "Port": service.port,
            "Address": service.address,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Datacenter": DATACENTER,
        }

    def _health_json(self, service: Service) -> dict[str, Any]:
        return {
            "Node": {
                "ID": "6f0b2a4e-5d1c-4c1e-9a57-0c0a5e1d0b0e",
                "Node": NODE,
                "Address": NODE_ADDRESS,
                "Datacenter": DATACENTER,
                "TaggedAddresses": {"lan": NODE_ADDRESS, "wan": NODE_ADDRESS},
                "Meta": {"consul-network-segment": ""},
                "CreateIndex": NODE_INDEX,
                "ModifyIndex": NODE_INDEX,
            },
            "Service": {
                "ID": service.service_id,
                "Service": service.name,
                "Tags": list(service.tags),
                "Address": service.address,
                "Meta": dict(service.meta) or None,  # the catalog keeps an unset map as null
                "Port": service.port,
                "Weights": {"Passing": 1, "Warning": 1},
                "EnableTagOverride": False,
                "CreateIndex": service.create_index,
                "ModifyIndex": service.modify_index,
            },
            "Checks": [
                self._serf_health(),
                *(self._check_json(service, c) for c in service.checks.values()),
            ],
        }

    @staticmethod
    def _check_json(service: Service, check: Check) -> dict[str, Any]:
        return {
            "Node": NODE,
            "CheckID": check.check_id,
            "Name": check.name,
            "Status": check.status,
            "Notes": "",
            "Output": check.output,
            "ServiceID": service.service_id,
            "ServiceName": service.name,
            "ServiceTags": list(service.tags),
            "Type": "http",
            "Definition": dict(check.definition),
            "CreateIndex": check.create_index,
            "ModifyIndex": check.modify_index,
        }

    @staticmethod
    def _serf_health() -> dict[str, Any]:
        return {
            "Node": NODE,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "CreateIndex": NODE_INDEX,
            "ModifyIndex": NODE_INDEX,
        }


# -- the DNS interface ----------------------------------------------------------------------

CONSUL_DOMAIN = dns.name.from_text("consul.")
UDP_ANSWER_LIMIT = 3  # Consul's dns_config.udp_answer_limit default


def _dns_service(name: dns.name.Name) -> str | None:
    """The service a name asks for (``payment.service[.dc1].consul``, ``_payment._tcp...``)."""
    labels = [label.decode().lower() for label in name.relativize(CONSUL_DOMAIN).labels]
    if labels[-1:] == [DATACENTER]:
        labels = labels[:-1]
    if len(labels) == 3 and labels[1:] == ["_tcp", "service"] and labels[0].startswith("_"):
        return labels[0][1:]
    if len(labels) == 2 and labels[1] == "service":
        return labels[0]
    return None


def _dns_address(service: Service) -> str:
    return service.address or NODE_ADDRESS  # an empty address is the node's, as in Consul


def _dns_target(service: Service) -> str:
    if not service.address:
        return f"{NODE}.node.{DATACENTER}.consul."
    # Consul names an SRV target with its own address by the address in hex.
    return f"{ipaddress.IPv4Address(service.address).packed.hex()}.addr.{DATACENTER}.consul."


class ConsulDns:
    """Answers DNS queries from the agent's state as Consul's DNS interface does.

    >>> answers = ConsulDns(agent, service_ttl=2.0)
    >>> reply_wire = answers.answer(query_wire, udp=True)   # None: a packet Consul drops
    """

    def __init__(self, agent: ConsulDouble, *, service_ttl: float = 0.0) -> None:
        self.agent = agent
        self.service_ttl = service_ttl
        self.queries: list[tuple[str, str, str]] = []  # (udp|tcp, name, type), for tests

    def answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The reply to one query packet."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.FORMERR)
            return reply.to_wire()
        return self.respond(query, udp=udp).to_wire()

    def respond(self, query: dns.message.Message, *, udp: bool) -> dns.message.Message:
        """The reply message to a parsed query."""
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        type_text = dns.rdatatype.to_text(rdtype)
        self.queries.append(("udp" if udp else "tcp", name.to_text(), type_text))
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if not name.is_subdomain(CONSUL_DOMAIN):
            reply.flags &= ~dns.flags.AA
            reply.set_rcode(dns.rcode.REFUSED)  # an agent without recursors
        elif name == CONSUL_DOMAIN and rdtype == dns.rdatatype.SOA:
            reply.answer.append(self._soa())
        else:
            self._service_answer(reply, name, rdtype, udp=udp)
        return reply

    def _service_answer(
        self, reply: dns.message.Message, name: dns.name.Name, rdtype: int, *, udp: bool
    ) -> None:
        service = _dns_service(name)
        instances = self.agent.dns_instances(service) if service else []
        if not instances:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            reply.authority.append(self._soa())
            return
        random.shuffle(instances)  # Consul shuffles every answer: crude load spreading
        if udp:
            instances = instances[:UDP_ANSWER_LIMIT]
        if rdtype == dns.rdatatype.SRV:
            self._add_srv(reply, name, instances)
        elif rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            addresses = sorted({_dns_address(s) for s in instances})
            reply.answer.append(dns.rrset.from_text_list(name, self._ttl, "IN", "A", addresses))
        else:
            reply.authority.append(self._soa())  # the name exists, with no data of this type

    def _add_srv(
        self, reply: dns.message.Message, name: dns.name.Name, instances: list[Service]
    ) -> None:
        records = [f"1 1 {s.port} {_dns_target(s)}" for s in instances]
        reply.answer.append(dns.rrset.from_text_list(name, self._ttl, "IN", "SRV", records))
        targets = {_dns_target(s): _dns_address(s) for s in instances}
        for target, address in targets.items():
            reply.additional.append(dns.rrset.from_text(target, self._ttl, "IN", "A", address))

    @property
    def _ttl(self) -> int:
        return int(self.service_ttl)

    @staticmethod
    def _soa() -> dns.rrset.RRset:
        # Consul's SOA: serial = now, negative answers cacheable for soa.min_ttl (0 s).
        soa = f"ns.consul. hostmaster.consul. {int(time.time())} 3600 600 86400 0"
        return dns.rrset.from_text(CONSUL_DOMAIN, 0, "IN", "SOA", soa)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, answers: ConsulDns) -> None:
        self._answers = answers
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self._answers.answer(data, udp=True)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


class DnsServer:
    """Serves a :class:`ConsulDns` over UDP and TCP on one port (a free one if ``port=0``).

    ``stop()``/``start()`` take it down and up again on the same port.
    """

    def __init__(self, answers: ConsulDns, *, host: str = NODE_ADDRESS, port: int = 0) -> None:
        self.answers = answers
        self.host, self.port = host, port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Listen on UDP and TCP; a free port is retried until TCP gets the same number too."""
        loop = asyncio.get_running_loop()
        for _attempt in range(20):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self.answers), local_addr=(self.host, self.port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(
                    self._serve_stream, self.host, port, reuse_address=True
                )
            except OSError:
                udp.close()
                if self.port:
                    raise
                continue
            self._udp, self.port = udp, port
            return
        raise OSError("no port free for both UDP and TCP")

    async def stop(self) -> None:
        """Stop answering (both transports, open TCP connections included)."""
        if self._udp is not None:
            self._udp.close()
        for writer in list(self._streams):
            writer.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        self._udp = self._tcp = None

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._streams.add(writer)
        try:
            while True:  # RFC 1035 4.2.2: each message behind its two-byte length
                size = int.from_bytes(await reader.readexactly(2), "big")
                reply = self.answers.answer(await reader.readexactly(size), udp=False)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection: the usual end
        finally:
            self._streams.discard(writer)
            writer.close()


class _InTestServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # pytest owns SIGINT; a server inside a test must not take it over


class ConsulDoubleServer:
    """Serves a :class:`ConsulDouble` over real HTTP on a loopback port, in the running loop.

    ``stop()``/``start()`` take the HTTP API down and up on the same port while the agent's
    state and checks keep running: a client cut off from its agent, not an agent restart.
    The DNS interface (``dns_port``, UDP and TCP; ``dns.service_ttl`` to set the TTL) goes
    down and up with it.
    """

    def __init__(self, agent: ConsulDouble) -> None:
        self.agent = agent
        self.dns = ConsulDns(agent)
        self._dns_server = DnsServer(self.dns)
        self._port = 0
        self._socket: socket.socket | None = None
        self._server: _InTestServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Base URL of the agent's HTTP API."""
        return f"http://{NODE_ADDRESS}:{self._port}"

    @property
    def dns_port(self) -> int:
        """The DNS interface's port (UDP and TCP) on NODE_ADDRESS."""
        return self._dns_server.port

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen again (first time: on a free port, afterwards on the same one)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((NODE_ADDRESS, self._port))
        sock.listen()  # connections queue from now on, even before uvicorn accepts them
        self._port, self._socket = sock.getsockname()[1], sock
        self.agent.draining = False
        config = uvicorn.Config(
            self.agent,
            interface="asgi3",
            lifespan="off",
            ws="none",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = server = _InTestServer(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="consul-double")
        await self._dns_server.start()

    async def stop(self) -> None:
        """Stop listening; blocked queries are answered first, as on an agent shutdown."""
        if self._server is None or self._task is None:
            return
        await self._dns_server.stop()
        self.agent.draining = True
        self.agent.interrupt_blocking()
        self._server.should_exit = True
        async with asyncio.timeout(5):
            await self._task  # also surfaces why the server failed, if it did
        self._server = self._task = None
        if self._socket is not None:
            self._socket.close()


def main(argv: list[str] | None = None) -> None:
    """Serve the double as a Consul agent with Consul's own timing (the offline compose stack).

    ``python consul_double.py --host 0.0.0.0 --port 8500 --dns-port 8600``: the container that
    stands in for Consul where no Consul image can be had (deploy/compose/offline.yml).
    """
    parser = argparse.ArgumentParser(description="A Consul agent API double (no Consul binary).")
    parser.add_argument(
        "--host", default=NODE_ADDRESS, help=f"listen address (default {NODE_ADDRESS})"
    )
    parser.add_argument("--port", type=int, default=8500, help="HTTP port (default 8500)")
    parser.add_argument(
        "--dns-port", type=int, default=8600, help="DNS port, UDP and TCP (default 8600)"
    )
    parser.add_argument(
        "--dns-ttl",
        type=go_duration,
        default="0s",
        help="TTL of service records, a Go duration (default 0s, as Consul's service_ttl)",
    )
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port, dns_port=args.dns_port, dns_ttl=args.dns_ttl))


async def _serve(host: str, port: int, *, dns_port: int, dns_ttl: float) -> None:
    async with ConsulDouble() as agent:
        dns_server = DnsServer(ConsulDns(agent, service_ttl=dns_ttl), host=host, port=dns_port)
        await dns_server.start()
        config = uvicorn.Config(
            agent,
            host=host,
            port=port,
            interface="asgi3",
            lifespan="off",
            ws="none",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        try:
            await uvicorn.Server(config).serve()
        finally:
            await dns_server.stop()


if __name__ == "__main__":
    main()
