"""What the local servers of devtools (autoscaler, demo model server) share: where to listen."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from typing import Any


def server_parser(prog: str, description: str, port: int) -> argparse.ArgumentParser:
    """A command line with `--host` (loopback by default) and `--port` (0 picks a free one)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port, help="0 picks a free port")
    return parser


def run_server(main: Coroutine[Any, Any, None], name: str) -> int:
    """Run a server's `main` to its end: exit status 0, or 1 (said why) when it cannot listen."""
    try:
        asyncio.run(main)
    except OSError as error:
        print(f"{name}: cannot serve: {error}", file=sys.stderr)
        return 1
    return 0
