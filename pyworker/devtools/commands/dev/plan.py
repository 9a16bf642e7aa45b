"""What `pyworker dev` runs: the options it was given, the plan it draws from the worker config,
and the error that stops it."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyworker.backports import StrEnum
from pyworker.config import WorkerConfig
from pyworker.devtools.commands.dev.state import STATE_DIR

DEFAULT_WORKER = "hello_world"


class ModelServerMode(StrEnum):
    DEMO = "demo"
    EXTERNAL = "external"


class DevError(RuntimeError):
    """`pyworker dev` cannot go on; the message says why and where to look."""


@dataclass(frozen=True, slots=True)
class DevOptions:
    target: str = DEFAULT_WORKER
    model_server: ModelServerMode = ModelServerMode.DEMO
    model_command: tuple[str, ...] = ()
    """The model server's command line, split as a shell would (no shell runs it)."""
    model_url: str | None = None
    model_log: str | None = None
    demo_load_seconds: float = 2.0
    demo_tokens_per_second: float = 200.0
    endpoint: str | None = None
    state_dir: Path = Path(STATE_DIR)
    host: str = "127.0.0.1"
    autoscaler_port: int = 0
    worker_port: int = 0
    model_port: int = 0
    overrides: tuple[str, ...] = ()
    once: bool = False
    startup_timeout: float = 600.0

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> DevOptions:
        """The options of a parsed command line; ValueError for a command that does not split."""
        mode = ModelServerMode(arguments.model_server)
        command = tuple(shlex.split(arguments.model_command or ""))
        if command:
            mode = ModelServerMode.EXTERNAL
        return cls(
            target=arguments.worker,
            model_server=mode,
            model_command=command,
            model_url=arguments.model_url,
            model_log=arguments.model_log,
            demo_load_seconds=max(arguments.demo_load_seconds, 0.0),
            demo_tokens_per_second=max(arguments.demo_tokens_per_second, 0.0),
            endpoint=arguments.endpoint,
            state_dir=Path(arguments.state_dir).absolute(),
            host=arguments.host,
            autoscaler_port=arguments.autoscaler_port,
            worker_port=arguments.worker_port,
            model_port=arguments.model_port,
            overrides=tuple(arguments.overrides),
            once=arguments.once,
            startup_timeout=arguments.startup_timeout,
        )


@dataclass(slots=True)
class Plan:
    """What the session learnt from the worker config before starting anything."""

    config: WorkerConfig
    endpoint: str
    route: str
    example: dict[str, Any]
    dataset_file: str | None
