"""Bringing a WorkerStatus to a state the way the worker would: through legal moves only."""

from __future__ import annotations

from collections import deque

from pyworker.lifecycle.state import TRANSITIONS, WorkerState, WorkerStatus


def path(source: WorkerState, target: WorkerState) -> list[WorkerState]:
    """The shortest legal sequence of states after `source` that ends at `target`."""
    previous: dict[WorkerState, WorkerState] = {}
    queue = deque([source])
    while queue:
        state = queue.popleft()
        if state is target:
            steps = []
            while state is not source:
                steps.append(state)
                state = previous[state]
            return steps[::-1]
        for following in TRANSITIONS[state]:
            if following not in previous and following is not source:
                previous[following] = state
                queue.append(following)
    raise ValueError(f"no legal way from {source} to {target}")


def advance(status: WorkerStatus, target: WorkerState) -> None:
    """Move `status` to `target` through each state a real worker passes on the way."""
    for state in path(status.state, target):
        status.set_state(state)
