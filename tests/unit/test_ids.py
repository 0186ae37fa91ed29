import time
from collections import Counter

import pytest

from connector.ids import has_prefix, new_id


def test_ids_are_prefixed_unique_and_time_ordered() -> None:
    first = new_id("pay")
    time.sleep(0.002)
    later = [new_id("pay") for _ in range(200)]
    assert all(has_prefix(i, "pay") for i in later)
    assert len(set(later)) == 200
    assert all(first < i for i in later)


def test_unknown_prefix_is_refused() -> None:
    with pytest.raises(ValueError):
        new_id("nope")


def test_has_prefix_rejects_lookalikes() -> None:
    assert not has_prefix("pay_short", "pay")
    assert not has_prefix(new_id("conn"), "pay")


def test_ids_of_one_process_strictly_increase_within_a_millisecond() -> None:
    # Events of one transaction are often created in the same millisecond; their ids must still
    # sort in creation order, because delivery follows id order.
    burst = [new_id("evt")[4:] for _ in range(2000)]
    assert burst == sorted(burst) and len(set(burst)) == len(burst)
    per_ms = Counter(b[:10] for b in burst)
    assert max(per_ms.values()) > 1  # the case under test really happened
