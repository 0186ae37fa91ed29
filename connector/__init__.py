"""x402-connector domain: importable without FastAPI or Celery.

The API (``api/``) and the workers (``workers/``) both call the services defined here, so
business rules live in exactly one place.
"""

import sys as _sys

__version__ = "0.1.0"

#: The interpreter's own default. ``py_ecc`` (pulled in by eth-account) raises the limit to
#: 100,000 when it is first imported; at that depth the C JSON scanner overflows the C stack on a
#: deeply nested body and the process dies with SIGSEGV instead of raising RecursionError. Import
#: it once here, then put the limit back: later imports of py_ecc do not run its module code again.
SANE_RECURSION_LIMIT = 1000


def _restore_recursion_limit() -> None:
    before = _sys.getrecursionlimit()
    import py_ecc  # noqa: F401

    _sys.setrecursionlimit(min(before, SANE_RECURSION_LIMIT))


_restore_recursion_limit()
