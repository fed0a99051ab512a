"""Test-wide fixtures live in tests/support/*, loaded here as plugins so each kind stays apart."""

import importlib.util

pytest_plugins = [
    name
    for name in (
        "tests.support.postgres",
        "tests.support.rabbitmq",
        "tests.support.etcd",
        "tests.support.consul_double",
    )
    if importlib.util.find_spec(name) is not None
]
