"""A row of the environment-variable tables: the name, its default, its meaning, who reads it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Reader(Enum):
    """Who reads a variable; the reference has one table per reader."""

    PLATFORM = "Set by the platform, read by the worker"
    WORKER = "pyworker's own settings"
    CONFIG = "Overrides of the worker config"
    WORKERS = "Read by the ready workers in pyworker/workers/"
    START_SCRIPT = "Read by the container entrypoint scripts/on_start.sh"
    TOOLS = "Read by the developer commands (pyworker dev, call, load)"


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    """As a person reads it: a value, or what happens when the variable is unset."""
    meaning: str
    reader: Reader
