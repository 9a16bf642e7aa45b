"""The ramp's arithmetic: which N it tries, how a window counts requests at its edges."""

from __future__ import annotations

import pytest

from pyworker.lifecycle.ramp import Completion, concurrency_steps, prorata


def test_doubles_up_to_the_ceiling_and_ends_on_it() -> None:
    assert list(concurrency_steps(1)) == [1]
    assert list(concurrency_steps(8)) == [1, 2, 4, 8]
    assert list(concurrency_steps(12)) == [1, 2, 4, 8, 12]
    # Twice an engine's declared 6: its own limit is a step too.
    assert list(concurrency_steps(12, declared=6)) == [1, 2, 4, 6, 8, 12]
    assert list(concurrency_steps(32, declared=16)) == [1, 2, 4, 8, 16, 32]


def test_a_window_counts_each_request_for_its_part_inside() -> None:
    records = [
        Completion(0.0, 2.0, 10.0),  # half inside [1, 3]: 5
        Completion(1.5, 2.5, 4.0),  # all inside: 4
        Completion(2.0, 6.0, 8.0),  # a quarter inside: 2
        Completion(3.0, 4.0, 100.0),  # after: nothing
        Completion(1.0, 2.0, None),  # failed: nothing
    ]
    assert prorata(records, 1.0, 3.0) == pytest.approx((5 + 4 + 2) / 2)


def test_back_to_back_windows_count_every_request_once() -> None:
    records = [Completion(start, start + 0.7, 7.0) for start in (0.0, 0.5, 1.1, 1.9, 2.4)]
    windows = [prorata(records, edge, edge + 1.0) for edge in (0.0, 1.0, 2.0, 3.0)]
    assert sum(windows) == pytest.approx(5 * 7.0)  # 1-second windows covering [0, 4]
