"""Shared fixtures live in tests/fixtures/, one module per area, registered here."""

pytest_plugins = [
    "tests.fixtures.net",
    "tests.fixtures.db",
    "tests.fixtures.chain",
    "tests.fixtures.facilitator",
    "tests.fixtures.api",
    "tests.fixtures.stack",
    "tests.fixtures.faults",
]
