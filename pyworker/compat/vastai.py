"""The reference SDK's API on pyworker: change `from vastai import ...` to this module.

    from pyworker.compat.vastai import (
        BenchmarkConfig, HandlerConfig, LogActionConfig, Worker, WorkerConfig,
    )

`Worker(config).run()` translates the reference config into pyworker's own (refusing, with
exit status 2 and a message naming the field, what pyworker cannot honour) and serves it the
way `python -m workers.<name>.worker` does: the environment's overrides, signature checks,
readiness, benchmark and reports all apply. docs/migrating.md maps every field.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from pyworker.compat.reference import (
    BenchmarkConfig,
    HandlerConfig,
    JsonDataException,
    LogActionConfig,
    WorkerConfig,
)
from pyworker.compat.translate import UnsupportedField, translate
from pyworker.config import WorkerConfig as NativeConfig
from pyworker.config.environment import Environment, InvalidEnvironment
from pyworker.config.loader import ConfigError

__all__ = [
    "BenchmarkConfig",
    "HandlerConfig",
    "JsonDataException",
    "LogActionConfig",
    "UnsupportedField",
    "Worker",
    "WorkerConfig",
]

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class Worker:
    """The reference `Worker`: give it a `WorkerConfig`, then `run()` serves until stopped."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config

    def native_config(self) -> NativeConfig:
        """pyworker's own config for this worker: the second step of docs/migrating.md."""
        return translate(self.config)

    def run(self, **kwargs: Any) -> NoReturn:
        """Serve; the process exits with the worker's status (2: a config pyworker refuses).

        Like the reference, `host=` says where to listen; `port=` is used when `WORKER_PORT`
        is not set (the reference reads only `WORKER_PORT`).
        """
        from pyworker.entry import serve_status

        try:
            native = translate(self.config)
            settings, notes = listen_settings(kwargs, os.environ)
        except ConfigError as error:
            print(f"pyworker: {error}", file=sys.stderr)
            sys.exit(2)
        for note in notes:
            print(f"pyworker: {note}", file=sys.stderr)
        os.environ.update(settings)
        sys.exit(serve_status(native, source=_main_file()))

    async def run_async(self, **kwargs: Any) -> NoReturn:
        """Refused: pyworker owns its event loop (uvloop, signals, draining)."""
        print(
            "pyworker: Worker.run_async: pyworker runs its own event loop; call "
            "Worker(config).run() from the worker module instead",
            file=sys.stderr,
        )
        sys.exit(2)


def listen_settings(
    kwargs: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The environment variables that `run(**kwargs)` stands for, and notes to print.

    Variables already set win: they are the platform's (or the operator's) word.
    """
    settings: dict[str, str] = {}
    notes: list[str] = []
    for name, value in kwargs.items():
        if name == "host":
            if not isinstance(value, str) or not value:
                raise UnsupportedField("Worker.run(host=...)", f"{value!r} is not a host")
            if environ.get("WORKER_HOST"):
                continue
            if value not in LOOPBACK and _is_local(environ):
                notes.append(
                    f"run(host={value!r}) not used: off the platform (no CONTAINER_ID or "
                    "REPORT_ADDR) pyworker listens on loopback only, since nothing checks "
                    "signatures; set WORKER_HOST to listen elsewhere"
                )
                continue
            settings["WORKER_HOST"] = value
        elif name == "port":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
                raise UnsupportedField("Worker.run(port=...)", f"{value!r} is not a TCP port")
            if not environ.get("WORKER_PORT"):
                settings["WORKER_PORT"] = str(value)
        elif name == "reuse_address" and value is True:
            continue  # pyworker always listens with SO_REUSEADDR
        else:
            raise UnsupportedField(
                f"Worker.run({name}=...)",
                "pyworker sets its own socket options (backlog 4096, SO_REUSEADDR, shutdown "
                "by draining: PYWORKER_GRACE); remove the argument",
            )
    return settings, notes


def _is_local(environ: Mapping[str, str]) -> bool:
    try:
        return Environment.from_env(environ).local
    except InvalidEnvironment:
        return True  # reported by the worker's own start; keep to loopback meanwhile


def _main_file() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return os.path.basename(path) if isinstance(path, str) else "worker.py"
