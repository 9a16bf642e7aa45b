"""`python -m workers.<name>.worker`: a worker module that serves itself.

Vast's start script runs `python3 -m workers.$BACKEND.worker` (or `python3 -m worker` for a
`worker.py` at a repository's root) and expects it to serve. A worker module ends with
`if __name__ == "__main__": serve(worker)`, which does what `pyworker run` does with that
config: the environment's overrides, validation (exit 2 naming the field), then serving.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment, InvalidEnvironment
from pyworker.config.loader import ConfigError, apply_overrides, raw_config
from pyworker.startup.failure import fail

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """One log format for a worker, whether `pyworker run` or a worker module started it."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def serve(worker: WorkerConfig | dict[str, object], source: str = "worker.py") -> NoReturn:
    """Serve `worker` with the process environment; exits with the worker's status."""
    sys.exit(serve_status(worker, source))


def serve_status(worker: WorkerConfig | dict[str, object], source: str = "worker.py") -> int:
    from pyworker.serving.server import run

    environ = dict(os.environ)
    configure_logging(environ.get("PYWORKER_LOG_LEVEL", "INFO"))
    try:
        environment = Environment.from_env(environ)
        config = apply_overrides(raw_config(worker, source), (), environment, source=source)
    except (ConfigError, InvalidEnvironment) as error:
        fail(str(error), environ)
        return 2
    return run(config, environment)
