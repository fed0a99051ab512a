"""Settings: one pydantic-settings class per service on a shared base.

Settings are read from the environment (no prefix: ``DATABASE_URL``, ``PORT``...) once, in the
service's ``main``, and passed down; nothing reads the environment at import time.

>>> settings = load_settings(OrderSettings)   # exits with one line naming a bad variable
>>> app = create_app(settings)
"""

from __future__ import annotations

import socket
import sys
from typing import ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
# HS256 wants a key at least as long as its hash (RFC 7518 3.2): 32 bytes.
MIN_SECRET_LENGTH = 32
# Idempotency keys and inbox rows guard against a replay: they must outlive any retry of one
# key (a saga's deadline and its undo retries are minutes, a parked saga's re-drive or a
# dead-lettered message's may come after an outage) by a wide margin. 0 still means "keep".
MIN_DEDUP_RETENTION_DAYS = 1.0


class ServiceSettings(BaseSettings):
    """What every service needs to know; subclasses set the service name and defaults."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, validate_default=True)

    service_name: ClassVar[str] = "service"
    default_port: ClassVar[int] = 8000

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(0, ge=0, le=65535, description="Port to listen on (0: the service default).")
    advertise_host: str = Field(
        "", description="Address peers should call (default: HOST, or this host's IP for 0.0.0.0)."
    )
    instance_id: str = Field(
        "", description="Unique id in the registry (default: service-host-port)."
    )
    database_url: str = Field("", description="PostgreSQL DSN of this service's own database.")
    db_pool_max: int = Field(10, ge=1, le=200, description="Most connections in the pool.")
    rabbitmq_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="AMQP URL.")
    registry: Literal["etcd", "consul", "dns"] = Field("etcd", description="Discovery backend.")
    etcd_url: str = Field("http://127.0.0.1:2379", description="etcd v3 JSON gateway URL.")
    consul_url: str = Field("http://127.0.0.1:8500", description="Consul agent URL.")
    # REGISTRY=dns: SRV lookups, membership as stale as the answers' TTL (discovery/dns.py).
    dns_server: str = Field(
        "",
        pattern=r"^([\w.-]+|\[[0-9a-fA-F:.]+\])?(:\d{1,5})?$",
        description="DNS server host:port (empty: /etc/resolv.conf).",
    )
    dns_domain: str = Field("service.consul", description="Domain of <service>.<domain> SRV.")
    dns_port_name: str = Field("", description="Ask _<name>._tcp.<service>.<domain> (k8s).")
    # A DNS label's characters only: it becomes part of one label of the query name.
    dns_name_suffix: str = Field(
        "",
        pattern=r"^[a-z0-9-]{0,40}$",
        description="Appended to <service> in the SRV name (k8s headless Service: -peers).",
    )
    dns_register: Literal["consul", "none"] = Field(
        "consul", description="Who registers: Consul's HTTP API, or none (the platform)."
    )
    registry_ttl: float = Field(3.0, gt=0, le=60, description="etcd lease TTL, seconds.")
    health_timeout: float = Field(1.0, gt=0, le=30, description="Timeout of each health check.")
    log_level: LogLevel = Field("INFO", description="Log level.")
    outbox_relay: Literal["elected", "standalone", "off"] = Field(
        "elected", description="Who relays the outbox: the etcd-elected instance, this one, none."
    )
    max_body_bytes: int = Field(
        65536,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest request body in bytes; a larger one gets 413 before it is read.",
    )
    idempotency_retention_days: float = Field(
        7.0,
        ge=0,
        le=3650,
        description=(
            "Days a command's idempotency key and stored answer are kept (0: for ever; else at"
            " least 1). A retry with a pruned key runs the command again, so this must far"
            " outlive the longest retry of one key: a saga's deadline and its undo retries"
            " (minutes), a parked saga re-driven by an operator after an outage."
        ),
    )
    inbox_retention_days: float = Field(
        7.0,
        ge=0,
        le=3650,
        description=(
            "Days a consumer remembers an applied event id (0: for ever; else at least 1). An"
            " event redelivered after its row is pruned is applied again, so this must outlive"
            " the broker's redelivery horizon: queues have no message TTL, and dead-lettered"
            " or quarantined events may be re-driven after an outage."
        ),
    )
    history_retention_days: float = Field(
        30.0,
        ge=0,
        le=3650,
        description=(
            "Days the order timeline and the step log of finished (completed or cancelled)"
            " sagas are kept (0: for ever). Running and parked sagas keep their steps."
        ),
    )
    prune_interval: float = Field(
        60.0, gt=0, le=86400, description="Seconds between two passes of the retention pruner."
    )
    loop_grace: float = Field(
        10.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a background loop (relay, consumer, saga recovery...) may keep failing or"
            " restarting before readiness fails."
        ),
    )
    # Tracing (ordermesh_shared.tracing): the standard OpenTelemetry variables, off unless
    # an exporter is named.
    otel_exporter_otlp_endpoint: str = Field(
        "",
        description=(
            "OTLP/HTTP collector base URL (e.g. http://jaeger:4318); traces go to"
            " <url>/v1/traces. Unset (and no other OTEL_* exporter setting): tracing off."
        ),
    )
    otel_exporter_otlp_traces_endpoint: str = Field(
        "", description="Full OTLP/HTTP traces URL; wins over OTEL_EXPORTER_OTLP_ENDPOINT."
    )
    otel_traces_exporter: Literal["", "otlp", "console", "none"] = Field(
        "",
        description=(
            "Trace exporter: otlp (default when an endpoint is set), console (spans on"
            " stdout), none (off whatever else is set)."
        ),
    )
    # No defaults for secrets: a deployment generates its own (make dev / make up do).
    service_token_secret: SecretStr = Field(
        min_length=MIN_SECRET_LENGTH,
        description="Key signing and checking the service tokens of internal calls (required).",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Token for admin endpoints (X-Admin-Token); unset: admin endpoints disabled.",
    )

    @field_validator("idempotency_retention_days", "inbox_retention_days")
    @classmethod
    def _dedup_floor(cls, days: float) -> float:
        if 0 < days < MIN_DEDUP_RETENTION_DAYS:
            raise ValueError(
                f"must be 0 (keep for ever) or at least {MIN_DEDUP_RETENTION_DAYS:g} day(s):"
                " a retry or redelivery after its row is pruned would apply a second time"
            )
        return days

    @model_validator(mode="after")
    def _fill_derived(self) -> ServiceSettings:
        # Derived defaults depend on other fields, so they are filled after validation.
        port = self.port or self.default_port
        advertise = self.advertise_host or _default_advertise_host(self.host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "advertise_host", advertise)
        if not self.instance_id:
            object.__setattr__(self, "instance_id", f"{self.service_name}-{advertise}-{port}")
        if not self.database_url:
            dsn = f"postgresql://postgres@127.0.0.1:5432/ordermesh_{self.service_name}"
            object.__setattr__(self, "database_url", dsn)
        return self


def _default_advertise_host(host: str) -> str:
    if host not in ("0.0.0.0", "::", ""):
        return host
    # In a container the hostname resolves to the container's address on its network.
    return socket.gethostbyname(socket.gethostname())


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def describe_error(exc: ValidationError) -> str:
    """One line naming each bad variable and why, e.g. ``PORT='x': Input should be ...``."""
    parts = []
    for err in exc.errors():
        name = "_".join(str(p) for p in err["loc"]).upper() or "SETTINGS"
        value = err.get("input")
        visible = isinstance(value, str | int | float) and not _is_secret(name)
        shown = f"={value!r}" if visible else ""
        parts.append(f"{name}{shown}: {err['msg']}")
    return "; ".join(parts)


def _is_secret(name: str) -> bool:
    # A secret's value never goes to a log or a terminal, not even a wrong one.
    return any(word in name for word in ("SECRET", "TOKEN", "PASSWORD"))


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Build settings from the environment, or exit(2) with one line naming the bad variable."""
    try:
        return cls()
    except ValidationError as exc:
        print(
            f"ordermesh-{cls.service_name}: invalid settings: {describe_error(exc)}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
