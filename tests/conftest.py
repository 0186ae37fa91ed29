"""Shared fixtures live in tests/fixtures/, one module per area, registered here."""

import ast
import sys
import threading
from typing import Any

pytest_plugins = [
    "tests.fixtures.net",
    "tests.fixtures.db",
    "tests.fixtures.chain",
    "tests.fixtures.facilitator",
    "tests.fixtures.api",
    "tests.fixtures.stack",
    "tests.fixtures.faults",
]

if sys.version_info < (3, 11, 8):
    # CPython before 3.11.8 keeps the AST constructor's recursion depth in one shared struct
    # (gh-106905): two threads building ASTs at once can fail one of them with "SystemError: AST
    # constructor recursion depth mismatch". Hypothesis parses source in the test thread while the
    # servers of a test run in others; it crashed test_openapi_fuzz once. Serialise ast.parse in
    # the test process. The service itself never parses Python.
    _parse = ast.parse
    _parse_lock = threading.RLock()

    def _serialised_parse(*args: Any, **kwargs: Any) -> Any:
        with _parse_lock:
            return _parse(*args, **kwargs)

    ast.parse = _serialised_parse
