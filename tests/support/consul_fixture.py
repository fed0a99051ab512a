"""The ``consul_double`` fixture (a pytest plugin): the double itself stays free of pytest, so
the same file runs as the Consul container of the offline compose stack."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.consul_double import FAST_TIMING, ConsulDouble, ConsulDoubleServer


@pytest.fixture
async def consul_double() -> AsyncIterator[ConsulDoubleServer]:
    """A Consul agent double on a free loopback port with compressed timing (FAST_TIMING)."""
    async with ConsulDouble(timing=FAST_TIMING) as agent, ConsulDoubleServer(agent) as server:
        yield server
