"""The webhook wake-up fires on the leading and trailing edge of a burst, never in between."""

from __future__ import annotations

import threading
import time

from workers.wiring import Debounced


def test_a_burst_gives_one_leading_and_one_trailing_wake() -> None:
    fired: list[float] = []
    done = threading.Event()

    def fire() -> None:
        fired.append(time.monotonic())
        if len(fired) == 2:
            done.set()

    wake = Debounced(fire, interval=0.2)
    start = time.monotonic()
    for _ in range(50):  # many commits inside one window
        wake()
    assert len(fired) == 1  # the leading edge fired at once, the rest were folded
    assert done.wait(2.0)  # the trailing edge covers the commits made inside the window
    assert len(fired) == 2 and fired[1] - start >= 0.19
    time.sleep(0.3)
    assert len(fired) == 2  # nothing more without new commits


def test_a_quiet_period_lets_the_next_commit_wake_at_once() -> None:
    fired: list[int] = []
    wake = Debounced(lambda: fired.append(1), interval=0.05)
    wake()
    time.sleep(0.08)
    wake()
    assert fired == [1, 1]
