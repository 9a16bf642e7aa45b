"""`pyworker dev [WORKER]`: the whole serverless path on this machine, in one command.

It starts a local autoscaler (in this process), a model server (the built-in demo by default,
or yours) and the worker as `pyworker run`, wired as on Vast.ai: the worker fetches the
autoscaler's public key, checks every signature and reports to it. It shows the worker
loading, benchmarking and becoming ready, sends one request routed by the autoscaler and
prints the answer, then says how to call it and runs until Ctrl-C, which stops every process
it started (SIGTERM, a bounded wait, then SIGKILL). `--once` stops after that first request.

Logs and caches go to the state dir (`.pyworker/` here by default), with `dev.json`, which
`pyworker call` and `pyworker load` read to find the autoscaler.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pyworker.devtools.commands.arguments import add_command
from pyworker.devtools.commands.dev.plan import DEFAULT_WORKER, DevOptions, ModelServerMode
from pyworker.devtools.commands.dev.session import DevSession
from pyworker.devtools.commands.dev.state import STATE_DIR


def add_parser(commands: Any) -> None:
    summary = "run the autoscaler, a model server and a worker locally, and call it once"
    parser = add_command(commands, "dev", summary, __doc__)
    parser.add_argument(
        "worker",
        nargs="?",
        default=DEFAULT_WORKER,
        help="a workers/ folder name, a .toml or .py config, or a module "
        f"(default {DEFAULT_WORKER})",
    )
    _add_model_arguments(parser)
    _add_session_arguments(parser)
    parser.set_defaults(handler=command_dev)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model server")
    model.add_argument(
        "--model-server",
        choices=[mode.value for mode in ModelServerMode],
        default=ModelServerMode.DEMO.value,
        help="demo: start the built-in demo server (default); external: use the one in the "
        "worker's config (or --model-url), started by you or by --model-command",
    )
    model.add_argument(
        "--model-command",
        metavar="CMD",
        help="start this command as the model server (implies external); its output is the "
        "model log",
    )
    model.add_argument("--model-url", help="external model server URL (default: the config's)")
    model.add_argument(
        "--model-log",
        metavar="FILE",
        help="external model server log (default: the config's; with --model-command, "
        "STATE_DIR/model.log)",
    )
    model.add_argument(
        "--demo-load-seconds", type=float, default=2.0, help="demo server's simulated load time"
    )
    model.add_argument(
        "--demo-tokens-per-second",
        type=float,
        default=200.0,
        help="demo server's pace per request (0: as fast as possible)",
    )


def _add_session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", help="endpoint name (default: the worker config's name)")
    parser.add_argument(
        "--state-dir",
        default=STATE_DIR,
        help=f"logs, caches and dev.json (default: ./{STATE_DIR})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address everything listens on")
    parser.add_argument("--autoscaler-port", type=int, default=0, help="0: a free port (default)")
    parser.add_argument("--worker-port", type=int, default=0, help="0: a free port (default)")
    parser.add_argument("--model-port", type=int, default=0, help="demo server port; 0: free")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a worker config field, as in `pyworker run`",
    )
    parser.add_argument(
        "--once", action="store_true", help="stop everything after the first request"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long the worker may take to become ready (default 600)",
    )
    parser.add_argument("--log-level", default="WARNING", help="of this process (default WARNING)")


def command_dev(arguments: argparse.Namespace) -> int:
    try:
        options = DevOptions.from_arguments(arguments)
    except ValueError as error:  # a --model-command that does not split, e.g. an open quote
        print(f"pyworker dev: {error}", file=sys.stderr)
        return 2
    session = DevSession(options)
    try:
        return asyncio.run(session.main())
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 130
