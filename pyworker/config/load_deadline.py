"""How long a worker waits for its model to load before it tells the autoscaler it gave up.

A model that never finishes loading (a stuck download, an engine that hangs) would otherwise
leave the worker in LOADING for ever, costing money while nothing says it is broken. Past the
deadline the worker becomes ERRORED, with an `error_msg` that says so, and reports at once; it
keeps watching, and a model that loads later still makes it ready.

A first start may download the model, so it gets a generous deadline (`PYWORKER_LOAD_TIMEOUT`,
2 h). A restart on a machine where this model already loaded (the benchmark cache holds a
result for these GPUs and this model) only reads it from disk, so it gets a shorter one
(`PYWORKER_RELOAD_TIMEOUT`, 30 min). 0 turns a deadline off.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LOAD_TIMEOUT = 7200.0
DEFAULT_RELOAD_TIMEOUT = 1800.0
LOAD_VARIABLE = "PYWORKER_LOAD_TIMEOUT"
RELOAD_VARIABLE = "PYWORKER_RELOAD_TIMEOUT"


@dataclass(frozen=True)
class LoadDeadline:
    """Seconds to wait for the model's first load; 0 means no deadline."""

    first_start: float = DEFAULT_LOAD_TIMEOUT
    restart: float = DEFAULT_RELOAD_TIMEOUT

    def seconds(self, loaded_here_before: bool) -> float:
        return self.restart if loaded_here_before else self.first_start

    @staticmethod
    def variable(loaded_here_before: bool) -> str:
        return RELOAD_VARIABLE if loaded_here_before else LOAD_VARIABLE


def never_loaded_message(seconds: float, loaded_here_before: bool) -> str:
    """The `error_msg`: what happened, how long it waited, and what to change."""
    occasion = "restart of a model that loaded here before" if loaded_here_before else "first start"
    return (
        f"model never loaded: no load signal from the model server after waiting "
        f"{_duration(seconds)} ({occasion}; {LoadDeadline.variable(loaded_here_before)}="
        f"{seconds:g}). Still watching: the worker becomes ready if the model loads later."
    )


def never_entered_message(name: str, seconds: float, loaded_here_before: bool) -> str:
    """The `error_msg` of a model loaded in the worker's process whose lifecycle hangs."""
    occasion = "restart of a model that loaded here before" if loaded_here_before else "first start"
    return (
        f"model never loaded: the model lifecycle {name} was not entered (its __aenter__ or "
        f"setup still running) after waiting {_duration(seconds)} ({occasion}; "
        f"{LoadDeadline.variable(loaded_here_before)}={seconds:g}). Still waiting: the worker "
        "becomes ready if it finishes."
    )


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
