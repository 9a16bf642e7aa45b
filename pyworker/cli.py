"""The `pyworker` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pyworker import __version__
from pyworker.config.environment import Environment, InvalidEnvironment
from pyworker.config.loader import ConfigError, load_config
from pyworker.entry import configure_logging
from pyworker.startup.failure import fail


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    """The whole command line; without `tools`, only `run`.

    `pyworker run` is what every GPU worker executes, for its whole life: leaving out the
    developer commands (dev, call, load, bench and the local autoscaler they import) keeps about
    1.4 MiB out of its memory.
    """
    parser = argparse.ArgumentParser(prog="pyworker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyworker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve a worker in front of its model server")
    run.add_argument("target", help="a workers/ folder name, a .toml or .py config, or a module")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set routes.0.max_queue_time=30",
    )
    run.add_argument("--port", type=int, help="listen port (default: WORKER_PORT or 3000)")
    run.add_argument("--host", help="listen address (default: 0.0.0.0, or 127.0.0.1 locally)")
    run.add_argument("--log-level", default=os.environ.get("PYWORKER_LOG_LEVEL", "INFO"))
    run.set_defaults(handler=command_run)
    if tools:
        from pyworker.devtools.commands import bench, call, load
        from pyworker.devtools.commands.dev import command as dev

        for command in (dev, call, load, bench):
            command.add_parser(commands)
    return parser


def command_run(arguments: argparse.Namespace) -> int:
    from pyworker.serving.server import run

    environ = dict(os.environ)
    if arguments.port is not None:
        environ["WORKER_PORT"] = str(arguments.port)
    if arguments.host:
        environ["WORKER_HOST"] = arguments.host
    try:
        environment = Environment.from_env(environ)
        config = load_config(arguments.target, arguments.overrides, environment)
    except (ConfigError, InvalidEnvironment) as error:
        fail(str(error), environ)
        return 2
    return run(config, environment)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(tools=argv[:1] != ["run"])
    arguments = parser.parse_args(argv)
    configure_logging(getattr(arguments, "log_level", "INFO"))
    handler = arguments.handler
    result: int = handler(arguments)
    return result
