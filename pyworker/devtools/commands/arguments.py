"""The command-line pieces the developer commands share."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pyworker.devtools.commands.dev.state import DevState
from pyworker.devtools.commands.routing import NoAutoscaler, Target

DEFAULT_WAIT = 60.0
DEFAULT_TIMEOUT = 600.0


def add_command(commands: Any, name: str, summary: str, doc: str | None) -> argparse.ArgumentParser:
    """A subcommand whose `--help` shows `doc` (its module docstring) as written."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `call` and `load` share: where the autoscaler is and how long to wait."""
    parser.add_argument(
        "--autoscaler",
        metavar="URL",
        help="autoscaler base URL (default: the running `pyworker dev`'s)",
    )
    parser.add_argument(
        "--endpoint", help="endpoint name (default: the running `pyworker dev`'s, else hello_world)"
    )
    parser.add_argument("--api-key", default="", help="api_key sent to /route/ (default: none)")
    parser.add_argument(
        "--cost",
        type=float,
        help="cost announced to /route/ (default: the payload's max_tokens, else 100)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"how long to keep asking while no worker is ready (default {DEFAULT_WAIT:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"limit on each worker request (default {DEFAULT_TIMEOUT:g})",
    )


def resolve_target(
    arguments: argparse.Namespace, state: DevState | None, command: str
) -> Target | None:
    """The autoscaler and endpoint the flags name; None, the reason printed, when there is none."""
    try:
        return Target.resolve(arguments.autoscaler, arguments.endpoint, arguments.api_key, state)
    except NoAutoscaler as error:
        print(f"pyworker {command}: {error}", file=sys.stderr)
        return None
