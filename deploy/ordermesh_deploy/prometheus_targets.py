"""The local stack's scrape targets, for a Prometheus installed on this machine.

``ordermesh-local up`` writes ``<run dir>/prometheus/targets.json`` each time it starts
instances: Prometheus's file-based service discovery format (``file_sd_configs``), one target
group per service labelled ``service=<name>``, every instance's ``host:port`` in it, scaled
replicas included. ``deploy/observability/prometheus-local.yml`` reads it; Prometheus notices
when the file changes, so a restarted stack with another scale needs no Prometheus restart.

>>> write_targets(Path(".run"), {"payment-1": "http://127.0.0.1:8002", "order-1": ...})
PosixPath('.run/prometheus/targets.json')
>>> target_groups({"payment-1": "http://127.0.0.1:8002"})
[{'targets': ['127.0.0.1:8002'], 'labels': {'service': 'payment'}}]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

TARGETS_FILE = Path("prometheus") / "targets.json"

TargetGroup = dict[str, list[str] | dict[str, str]]


def target_groups(instances: Mapping[str, str]) -> list[TargetGroup]:
    """One file_sd target group per service from ``program -> base URL`` (``payment-2``)."""
    by_service: dict[str, list[str]] = {}
    for program in sorted(instances, key=_program_order):
        service = program.rpartition("-")[0]
        by_service.setdefault(service, []).append(urlsplit(instances[program]).netloc)
    return [
        {"targets": targets, "labels": {"service": service}}
        for service, targets in by_service.items()
    ]


def write_targets(run_dir: Path, instances: Mapping[str, str]) -> Path:
    """Write ``<run dir>/prometheus/targets.json`` for ``instances``; returns its path."""
    path = run_dir / TARGETS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(target_groups(instances), indent=2) + "\n")
    # Renamed into place: Prometheus watches the file and must never read half of it.
    partial.replace(path)
    return path


def _program_order(program: str) -> tuple[str, int]:
    service, _, number = program.rpartition("-")
    return service, int(number) if number.isdigit() else 0
