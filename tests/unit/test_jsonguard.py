"""The raw-byte JSON guard: nesting depth and NUL characters, before any parser runs."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from connector.jsonguard import has_nul, json_problem, nesting_exceeds


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_depth_counts_only_brackets_outside_strings() -> None:
    assert not nesting_exceeds(b'{"a":[1,2,{"b":"[[[[[[{{{{"}]}', 3)
    assert nesting_exceeds(b'{"a":[1,2,{"b":"[[[[[[{{{{"}]}', 2)
    assert nesting_exceeds(b"[[[]]]", 2)
    assert not nesting_exceeds(b"[[[]]]", 3)
    assert nesting_exceeds(b"[[[[]]", 3)  # unbalanced: refused, no parser would accept it


def test_a_hundred_thousand_levels_are_refused() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert json_problem(body) is not None


def test_nul_escapes_are_found_but_escaped_backslashes_are_not_nul() -> None:
    assert has_nul(b'"a\x00"')
    assert has_nul(b'"a\\u0000"')
    assert not has_nul(b'"a\\\\u0000"')  # backslash, then the text u0000
    assert has_nul(b'"a\\\\\\u0000"')
    assert not has_nul(b'"u0000"')


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.characters(codec="utf-8")),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=1, max_value=8))
def test_agrees_with_the_parser(value: object, limit: int) -> None:
    raw = json.dumps(value).encode()
    assert nesting_exceeds(raw, limit) == (_depth(value) > limit)
    assert has_nul(raw) == any("\x00" in s for s in _strings(value))
