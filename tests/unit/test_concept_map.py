"""The README's concept map names only what exists: every page panel, span, dashboard panel,
metric, log event, make target, command-line flag, URL and file it cites (in backticks) is
looked up in the code, so the map cannot drift from what a reader will find."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from fastapi import FastAPI
from inventory.app import InventorySettings
from inventory.app import create_app as inventory_app
from order.app import OrderSettings
from order.app import create_app as order_app
from payment.app import PaymentSettings
from payment.app import create_app as payment_app
from shipping.app import ShippingSettings
from shipping.app import create_app as shipping_app

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## The chapter's concepts, where to see them and where they live"
COLUMNS = ("concept", "page", "trace", "dashboard", "logs", "try it", "code")
# The chapter's concepts, as the issue lists them: each must have its row.
CONCEPTS = (
    "circuit breaker",
    "service discovery",
    "retries",
    "saga",
    "outbox",
    "leader election",
    "health",
    "lock",
    "inbox",
    "load shedding",
    "eventual consistency",
)
APPS: dict[int, Callable[[], FastAPI]] = {
    OrderSettings.default_port: lambda: order_app(OrderSettings()),
    InventorySettings.default_port: lambda: inventory_app(InventorySettings()),
    PaymentSettings.default_port: lambda: payment_app(PaymentSettings()),
    ShippingSettings.default_port: lambda: shipping_app(ShippingSettings()),
}


# -- the table -------------------------------------------------------------------------------


@cache
def rows() -> list[dict[str, list[str]]]:
    """The map's rows: per column, the names it cites in backticks (the concept: its text)."""
    readme = (ROOT / "README.md").read_text()
    assert SECTION in readme, f"README lacks the section {SECTION!r}"
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, rule, *body = lines
    assert len(cells(header)) == len(COLUMNS), header
    assert set(rule) <= set("|- "), rule
    return [parse(line) for line in body]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def parse(line: str) -> dict[str, list[str]]:
    found = cells(line)
    assert len(found) == len(COLUMNS), f"{len(found)} cells, not {len(COLUMNS)}: {line}"
    names = {c: re.findall(r"`([^`]+)`", cell) for c, cell in zip(COLUMNS, found, strict=True)}
    names["concept"] = [found[0]]
    return names


def cited(column: str) -> list[tuple[str, str]]:
    """(concept, name) for every name cited in ``column``."""
    return [(row["concept"][0], name) for row in rows() for name in row[column]]


# -- what exists -----------------------------------------------------------------------------


@cache
def python_sources(*parts: str) -> str:
    folders = parts or ("shared", "services", "deploy")
    files = (p for folder in folders for p in (ROOT / folder).rglob("*.py"))
    return "\n".join(p.read_text() for p in files if ".venv" not in p.parts)


def literal_in_code(text: str, *folders: str) -> bool:
    """Whether ``"text"`` is a string literal somewhere in the code."""
    return f'"{text}"' in python_sources(*folders)


@cache
def page_ids() -> set[str]:
    page = (ROOT / "services/order/order/overview/ui/index.html").read_text()
    return set(re.findall(r'\bid="([^"]+)"', page))


@cache
def span_patterns() -> list[re.Pattern[str]]:
    """Span and span-event names as tracing.py makes them ({...} parts: one word each)."""
    source = (ROOT / "shared/ordermesh_shared/tracing.py").read_text()
    names = re.findall(r'(?:start_as_current_span|add_event)\(\s*f?"([^"]+)"', source)
    assert names, "no span names found in tracing.py"
    return [
        re.compile(r"(\S+)".join(re.escape(p) for p in re.split(r"\{[^}]+\}", name)))
        for name in names
    ]


@cache
def dashboard_titles() -> set[str]:
    dashboard = json.loads((ROOT / "deploy/observability/grafana/ordermesh.json").read_text())
    return {panel["title"] for panel in dashboard["panels"]}


@cache
def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE))


@cache
def make_variables() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Z_]+) \?=", makefile, flags=re.MULTILINE))


@cache
def scripts() -> set[str]:
    project = tomllib.loads((ROOT / "deploy/pyproject.toml").read_text())
    return set(project["project"]["scripts"])


@cache
def routes(port: int) -> list[tuple[set[str], re.Pattern[str]]]:
    """The methods and path pattern of every documented route of the service on ``port``."""
    paths: dict[str, dict[str, object]] = APPS[port]().openapi()["paths"]
    return [({m.upper() for m in methods}, path_pattern(path)) for path, methods in paths.items()]


def path_pattern(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)))


def has_route(port: int, method: str, path: str) -> bool:
    path = re.sub(r"<[^>]+>", "x", path.split("?", 1)[0])  # <id>: any one segment
    return any(method in m and p.fullmatch(path) for m, p in routes(port))


# -- checks per kind of name -----------------------------------------------------------------


def is_span(name: str) -> bool:
    """A span of ours (each {...} part a name the code has), or an HTTP server span."""
    if found := re.fullmatch(r"(GET|POST|PUT|DELETE) (/\S*)", name):
        return has_route(OrderSettings.default_port, found[1], found[2])
    for pattern in span_patterns():
        if (match := pattern.fullmatch(name)) and all(map(literal_in_code, match.groups())):
            return True
    return False


def is_command(command: str) -> bool:
    words = command.split()
    if words[0] == "make":
        return make_command(words[1:])
    if words[:2] == ["uv", "run"]:
        return words[2] in scripts() and all(
            literal_in_code(w, "deploy") for w in words if w.startswith("--")
        )
    if words[0] == "curl":
        return curl_command(command)
    return False


def make_command(words: list[str]) -> bool:
    target, *assignments = words
    if target not in make_targets():
        return False
    for assignment in assignments:
        variable, _, value = assignment.partition("=")
        if variable not in make_variables():
            return False
        if not (value.isdigit() or literal_in_code(value, "deploy")):
            return False
    return True


def curl_command(command: str) -> bool:
    found = re.search(r"localhost:(\d+)(/\S*)", command)
    if found is None or int(found[1]) not in APPS:
        return False
    method = re.search(r"-X (\w+)", command)
    return has_route(int(found[1]), method[1] if method else "GET", found[2])


# -- the tests -------------------------------------------------------------------------------


def test_every_concept_of_the_chapter_has_a_row() -> None:
    concepts = [row["concept"][0] for row in rows()]
    for concept in CONCEPTS:
        assert any(concept in c for c in concepts), f"no row for {concept!r} in {concepts}"


def test_each_row_says_where_to_watch_the_concept() -> None:
    # A row may leave a column out (a dash), but every concept can be watched somewhere.
    for row in rows():
        assert row["logs"] or row["dashboard"], row["concept"]
        assert row["try it"], row["concept"]
        assert row["code"], row["concept"]


@pytest.mark.parametrize(("concept", "panel"), cited("page"))
def test_page_panels_exist(concept: str, panel: str) -> None:
    assert panel.startswith("#"), f"{concept}: cite the page's panels as #id, not {panel!r}"
    assert panel[1:] in page_ids(), f"{concept}: the page has no {panel}"


@pytest.mark.parametrize(("concept", "span"), cited("trace"))
def test_spans_are_ones_the_code_makes(concept: str, span: str) -> None:
    assert is_span(span), f"{concept}: no span or span event {span!r} is made by the code"


@pytest.mark.parametrize(("concept", "name"), cited("dashboard"))
def test_dashboard_panels_and_metrics_exist(concept: str, name: str) -> None:
    if re.fullmatch(r"[a-z_]+", name):
        assert literal_in_code(name, "shared", "services"), f"{concept}: no metric {name}"
    else:
        assert name in dashboard_titles(), f"{concept}: the dashboard has no panel {name!r}"


@pytest.mark.parametrize(("concept", "event"), cited("logs"))
def test_log_events_are_written_by_the_code(concept: str, event: str) -> None:
    assert literal_in_code(event), f"{concept}: no log event {event!r} in the code"


@pytest.mark.parametrize(("concept", "command"), cited("try it"))
def test_commands_exist(concept: str, command: str) -> None:
    assert is_command(command), f"{concept}: {command!r} names a target, flag or URL not there"


@pytest.mark.parametrize(("concept", "path"), cited("code"))
def test_code_paths_exist(concept: str, path: str) -> None:
    assert (ROOT / path).is_file(), f"{concept}: no file {path}"
