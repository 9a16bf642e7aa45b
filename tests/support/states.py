"""Bringing a WorkerStatus to a state the way the worker would: through the events it posts."""

from __future__ import annotations

from collections import deque

from pyworker.lifecycle.state import TRANSITIONS, LifecycleEvent, WorkerState, WorkerStatus


def path(source: WorkerState, target: WorkerState) -> list[LifecycleEvent]:
    """The shortest sequence of events that leads from `source` to `target`."""
    previous: dict[WorkerState, tuple[WorkerState, LifecycleEvent]] = {}
    queue = deque([source])
    while queue:
        state = queue.popleft()
        if state is target:
            events = []
            while state is not source:
                state, event = previous[state]
                events.append(event)
            return events[::-1]
        for event, following in TRANSITIONS[state].items():
            if following is not None and following not in previous and following is not source:
                previous[following] = (state, event)
                queue.append(following)
    raise ValueError(f"no events lead from {source} to {target}")


def advance(status: WorkerStatus, target: WorkerState, error_msg: str | None = None) -> None:
    """Move `status` to `target` through each state a real worker passes on the way.

    `error_msg` goes with the last event (the failure, for ERRORED).
    """
    events = path(status.state, target)
    for event in events[:-1]:
        status.handle(event)
    if events:
        status.handle(events[-1], error_msg)
