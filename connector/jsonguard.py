"""Cheap checks of untrusted JSON text *before* it reaches a JSON parser.

Why: CPython's C JSON scanner recurses once per nesting level. With the recursion limit raised
(``py_ecc`` sets it to 100,000 at import) a ~600 KB body nested 100,000 deep overflows the C
stack and kills the process with SIGSEGV, before any authentication or validation runs. And
PostgreSQL refuses NUL characters in text, so a ``\\u0000`` that reaches a query becomes a 500.

:func:`json_problem` scans the raw bytes in linear time (a regex to drop string literals, then a
bounded number of C-speed passes that peel off innermost bracket pairs) and says what is wrong,
or ``None``. It never builds a Python object from the input.
"""

from __future__ import annotations

import re

#: Default bound on nesting; real bodies of this API nest fewer than 10 levels.
DEFAULT_MAX_DEPTH = 32

# A JSON string literal (unrolled-loop form: linear, no catastrophic backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NUL_ESCAPE = re.compile(rb"(\\+)u0000")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def has_nul(raw: bytes) -> bool:
    """True when the text holds a NUL: raw, or as a JSON ``\\u0000`` escape (an escaped backslash
    followed by ``u0000`` is not one)."""
    if b"\x00" in raw:
        return True
    if b"u0000" not in raw:
        return False
    return any(len(m.group(1)) % 2 == 1 for m in _NUL_ESCAPE.finditer(raw))


def nesting_exceeds(raw: bytes, max_depth: int) -> bool:
    """True when arrays/objects nest deeper than ``max_depth`` (or brackets do not balance, which
    no parser would accept either). Brackets inside string literals do not count."""
    opened = raw.count(b"[") + raw.count(b"{")
    if opened <= max_depth:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    # Each pass removes every innermost pair, i.e. one level of nesting.
    for _ in range(max_depth):
        if not brackets:
            return False
        # Mark innermost pairs first, so a pair uncovered by removing one is left for next pass.
        marked = brackets.replace(b"[]", b"x").replace(b"{}", b"x")
        shorter = marked.translate(None, b"x")
        if len(shorter) == len(brackets):
            return True  # unbalanced or mismatched: not JSON anyway
        brackets = shorter
    return bool(brackets)


def json_problem(raw: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> str | None:
    """Why ``raw`` must not be parsed, or ``None`` when it is safe to hand to ``json.loads``."""
    if has_nul(raw):
        return "NUL characters (\\u0000) are not accepted"
    if nesting_exceeds(raw, max_depth):
        return f"JSON is malformed or nested deeper than {max_depth} levels"
    return None
