"""`pyworker call ROUTE --data JSON [--stream]`: one request through the autoscaler.

It routes like the real client (see pyworker.devtools.commands.routing) and prints the worker's
answer on stdout: JSON answers indented, streams as their chunks arrive. What went wrong goes to
stderr, and the exit status is 0 only for a 2xx answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

import aiohttp
import orjson

from pyworker.devtools.commands.arguments import add_command, add_target_arguments, resolve_target
from pyworker.devtools.commands.dev.state import find_state
from pyworker.devtools.commands.routing import (
    DataError,
    RoutingError,
    Target,
    current_state,
    default_cost,
    parse_data,
    route_request,
    worker_body,
    worker_url,
)

STATUS_TIMEOUT = 5.0
BROKEN_PIPE_STATUS = 141
"""128 + SIGPIPE: what a shell reports for a writer whose reader went away."""


def add_parser(commands: Any) -> None:
    summary = "send one request through the autoscaler and print the answer"
    parser = add_command(commands, "call", summary, __doc__)
    parser.add_argument("route", help="the worker route, e.g. /v1/completions")
    parser.add_argument(
        "--data", "-d", default="{}", help="the payload: JSON text, or @FILE (default: {})"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="print the answer as it arrives (sets payload.stream to true unless given)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="also show the routing on stderr"
    )
    add_target_arguments(parser)
    parser.set_defaults(handler=command_call, log_level="WARNING")


@dataclass(frozen=True, slots=True)
class CallRequest:
    target: Target
    route: str
    payload: Any
    cost: float
    stream: bool
    wait: float
    timeout: float
    verbose: bool


def command_call(arguments: argparse.Namespace) -> int:
    try:
        payload = parse_data(arguments.data)
    except DataError as error:
        print(f"pyworker call: {error}", file=sys.stderr)
        return 2
    if arguments.stream and isinstance(payload, dict):
        payload.setdefault("stream", True)
    state = current_state(arguments.autoscaler is not None)
    target = resolve_target(arguments, state, "call")
    if target is None:
        return 1
    request = CallRequest(
        target=target,
        route=arguments.route,
        payload=payload,
        cost=arguments.cost if arguments.cost is not None else default_cost(payload),
        stream=arguments.stream,
        wait=max(arguments.wait, 0.0),
        timeout=arguments.timeout,
        verbose=arguments.verbose,
    )
    try:
        return asyncio.run(call(request, sys.stdout.buffer))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return reader_gone()


def reader_gone() -> int:
    """The reader of stdout went away (`pyworker call --stream | head`): stop quietly.

    Python would print a traceback, then another when it flushes stdout at exit; stdout now
    points at /dev/null so that the exit is silent. The status is a shell's for SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_STATUS


async def call(request: CallRequest, out: BinaryIO) -> int:
    """Route, send, print; the exit status."""
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        try:
            auth_data = await route_request(session, request.target, request.cost, request.wait)
        except RoutingError as error:
            await _say(f"pyworker call: {error}")
            return 1
        url = worker_url(auth_data, request.route)
        if request.verbose:
            seconds = time.monotonic() - started
            await _say(
                f"routed by {request.target.autoscaler} to {auth_data['url']} "
                f"(request_idx {auth_data.get('request_idx')}) in {seconds:.3f} s"
            )
        try:
            async with session.post(
                url,
                data=worker_body(auth_data, request.payload),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=request.timeout),
            ) as response:
                if request.stream:
                    await _relay(response, out)
                else:
                    await _write(out, _pretty(await response.read()))
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            await _say(f"pyworker call: worker {url} failed: {error.__class__.__name__} {error}")
            return 1
        if status == 404:
            await _say_unknown_route(session, auth_data, request.route)
    if request.verbose or status >= 300:
        await _say(f"HTTP {status} in {time.monotonic() - started:.3f} s")
    return 0 if 200 <= status < 300 else 1


async def _say_unknown_route(
    session: aiohttp.ClientSession, auth_data: dict[str, Any], route: str
) -> None:
    """After a 404: name the worker's routes, unless the route is one (the model's 404)."""
    base = str(auth_data["url"]).rstrip("/")
    state = await asyncio.to_thread(find_state)
    own = state is not None and state.worker_url.rstrip("/") == base
    routes = await worker_routes(session, base, state.master_token if own and state else "")
    if routes is not None and route in routes:
        return  # a route of the worker: the 404 is the model server's own
    if routes:
        named = f"its routes: {', '.join(routes)} (e.g. pyworker call {routes[0]} --data JSON)"
    else:
        named = f"its routes are listed in {base}/status"
    await _say(f"pyworker call: the worker has no route {route}; {named}")


async def worker_routes(
    session: aiohttp.ClientSession, base: str, token: str = ""
) -> list[str] | None:
    """The routes a worker serves, from its `/status` (details need its MASTER_TOKEN); None
    when it does not say."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with session.get(
            base + "/status", headers=headers, timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT)
        ) as response:
            document = orjson.loads(await response.read())
    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError):
        return None
    routes = document.get("routes") if isinstance(document, dict) else None
    return [str(path) for path in routes] if isinstance(routes, dict) else None


async def _relay(response: aiohttp.ClientResponse, out: BinaryIO) -> None:
    """Write each chunk as it arrives; the answer's own framing (SSE, ndjson) is kept."""
    ended_with_newline = True
    async for chunk in response.content.iter_any():
        await _write(out, chunk)
        ended_with_newline = chunk.endswith(b"\n")
    if not ended_with_newline:
        await _write(out, b"\n")


def _pretty(body: bytes) -> bytes:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body if body.endswith(b"\n") or not body else body + b"\n"
    return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"


async def _write(out: BinaryIO, data: bytes) -> None:
    def write() -> None:
        out.write(data)
        out.flush()

    await asyncio.to_thread(write)


async def _say(text: str) -> None:
    await asyncio.to_thread(print, text, file=sys.stderr, flush=True)
