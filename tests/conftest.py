"""Test-wide fixtures live in tests/support/*, loaded here as plugins so each kind stays apart."""

import importlib.util

pytest_plugins = [
    name
    for name in (
        # Order matters: a plugin imported by another must be registered first.
        "tests.support.postgres",
        "tests.support.etcd",
        "tests.support.rabbitmq",
        "tests.support.consul_fixture",
        "tests.support.stack",
    )
    if importlib.util.find_spec(name) is not None
]
