from __future__ import annotations

from pyworker.lifecycle.accounting import Ledger, Outcome


def test_interval_counters_survive_a_report_in_flight() -> None:
    ledger = Ledger()
    first = ledger.receive(1, "/r", 10)
    sent = ledger.interval()
    second = ledger.receive(2, "/r", 5)  # arrives while the report is in flight
    ledger.commit_interval(sent)
    assert ledger.interval().new_load == 5 and ledger.interval().received == 1
    ledger.finish(first, Outcome.SUCCESS, 200)
    ledger.finish(second, Outcome.CANCELLED, 499)
    interval = ledger.interval()
    assert interval.served_load == 10 and interval.new_load == 0
    assert ledger.current_load == 0 and ledger.working_request_idxs() == []


def test_each_request_is_accounted_once() -> None:
    ledger = Ledger()
    record = ledger.receive(1, "/r", 10)
    ledger.finish(record, Outcome.SUCCESS, 200)
    ledger.finish(record, Outcome.ERROR, 500)
    assert [r.outcome for r in ledger.take_finished()] == [Outcome.SUCCESS]
    assert ledger.totals[Outcome.ERROR] == 0


def test_finished_requests_are_bounded_and_returned_in_order() -> None:
    ledger = Ledger(max_finished=3)
    for n in range(5):
        ledger.finish(ledger.receive(n, "/r", 1), Outcome.SUCCESS, 200)
    assert ledger.dropped_finished == 2
    taken = ledger.take_finished(limit=2)
    assert [r.request_idx for r in taken] == [2, 3]
    ledger.reject(9, "/r", 4, 429)
    ledger.return_finished(taken)  # the report failed: put them back, oldest first
    # Only one place was left: the oldest (2) is dropped, as the bound always does.
    assert [r.request_idx for r in ledger.take_finished()] == [3, 4, 9]
    assert ledger.dropped_finished == 3
