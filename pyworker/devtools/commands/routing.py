"""What a client does to reach a worker: ask the autoscaler, then call the worker it names.

1. `POST {autoscaler}/route/` with `{"endpoint", "api_key", "cost", "request_idx",
   "replay_timeout"}`. An answer with a `url` is the signed auth_data; any other answer is a
   waiting status: ask again (with the `request_idx` it gave) after a growing pause, for at most
   `wait` seconds.
2. `POST {url}{route}` with `{"auth_data", "payload", "session_id": null}`.

This is the reference client's protocol (vastai's `Serverless`), without its retries: `call`
and `load` show what happened instead of hiding it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pyworker.devtools.commands.dev.state import (
    DEFAULT_AUTOSCALER,
    DEFAULT_ENDPOINT,
    DevState,
    find_state,
    search_paths,
)

ROUTE_TIMEOUT = 10.0
FIRST_POLL = 0.1
MAX_POLL = 1.0
DEFAULT_COST = 100.0
"""The vastai client's default cost when a payload says nothing about its size."""
MAX_DATA_BYTES = 32 * 1024 * 1024


class RoutingError(Exception):
    """No worker could be reached through the autoscaler; the message says why."""


class DataError(ValueError):
    """A `--data` argument that is not usable JSON."""


class NoAutoscaler(RoutingError):
    """No `--autoscaler` was given and no `pyworker dev` runs: there is nothing to ask."""


@dataclass(frozen=True, slots=True)
class Target:
    """Which autoscaler to ask, for which endpoint."""

    autoscaler: str
    endpoint: str
    api_key: str = ""

    @classmethod
    def resolve(
        cls,
        autoscaler: str | None,
        endpoint: str | None,
        api_key: str | None,
        state: DevState | None,
    ) -> Target:
        """Flags win; then the running `pyworker dev` session; NoAutoscaler when neither.

        There is no default address: an autoscaler guessed at a well-known port may be
        another service, or an old one, and its answers would mislead.
        """
        base = autoscaler or (state.autoscaler if state else None)
        if not base:
            raise NoAutoscaler(no_autoscaler_message())
        name = endpoint or (state.endpoint if state else DEFAULT_ENDPOINT)
        return cls(base.rstrip("/"), name, api_key or "")


def no_autoscaler_message() -> str:
    looked = ", ".join(str(path) for path in search_paths())
    return (
        f"no `pyworker dev` is running (none found in {looked}), so there is no autoscaler to "
        "route through: start `pyworker dev` (in another terminal, from this folder), or pass "
        "--autoscaler URL (for a local autoscaler started with `python -m "
        f"pyworker.devtools.local.autoscaler`: --autoscaler {DEFAULT_AUTOSCALER})"
    )


def current_state(autoscaler_given: bool) -> DevState | None:
    """The running dev session, unless the autoscaler was named explicitly."""
    return None if autoscaler_given else find_state()


def parse_data(text: str) -> Any:
    """`--data`: JSON text, or `@file` holding JSON."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            with path.open("rb") as file:
                text_bytes = file.read(MAX_DATA_BYTES + 1)
        except OSError as error:
            raise DataError(f"--data {text}: {error.strerror}") from None
        if len(text_bytes) > MAX_DATA_BYTES:
            raise DataError(f"--data {text}: over {MAX_DATA_BYTES} bytes")
        source: bytes | str = text_bytes
    else:
        source = text
    try:
        return orjson.loads(source)
    except orjson.JSONDecodeError as error:
        raise DataError(f"--data is not valid JSON: {error}") from None


def default_cost(payload: object) -> float:
    """The cost to announce: the payload's `max_tokens` when it has one, else 100."""
    if isinstance(payload, Mapping):
        tokens = payload.get("max_tokens")
        if isinstance(tokens, int | float) and not isinstance(tokens, bool) and tokens > 0:
            return float(tokens)
    return DEFAULT_COST


async def route_request(
    session: aiohttp.ClientSession,
    target: Target,
    cost: float,
    wait: float,
) -> dict[str, Any]:
    """The auth_data for one request: poll the autoscaler until it names a worker."""
    deadline = time.monotonic() + wait
    request_idx = 0
    pause = FIRST_POLL
    while True:
        answer = await _ask(session, target, cost, request_idx)
        if isinstance(answer.get("url"), str) and answer["url"]:
            return answer
        given = answer.get("request_idx")
        if isinstance(given, int) and given > 0:
            request_idx = given
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RoutingError(f"no worker ready after {wait:g} s ({_waiting_summary(answer)})")
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, MAX_POLL)


async def _ask(
    session: aiohttp.ClientSession, target: Target, cost: float, request_idx: int
) -> dict[str, Any]:
    body = {
        "endpoint": target.endpoint,
        "api_key": target.api_key,
        "cost": cost,
        "request_idx": request_idx,
        "replay_timeout": ROUTE_TIMEOUT,
    }
    url = target.autoscaler + "/route/"
    try:
        async with session.post(
            url, data=orjson.dumps(body), headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=ROUTE_TIMEOUT),
        ) as response:  # fmt: skip
            text = await response.read()
            status = response.status
    except aiohttp.ClientConnectorError as error:
        reason = error.os_error.strerror or str(error)
        running = await asyncio.to_thread(find_state)
        raise RoutingError(
            f"cannot reach the autoscaler at {target.autoscaler}: {reason}"
            + _what_runs(target, running)
        ) from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        raise RoutingError(f"autoscaler {url} failed: {error.__class__.__name__}") from None
    try:
        answer = orjson.loads(text)
    except orjson.JSONDecodeError:
        answer = None
    if status != 200 or not isinstance(answer, dict):
        told = answer.get("error") if isinstance(answer, dict) else None
        reason = str(told) if told else text[:200].decode(errors="replace")
        raise RoutingError(f"autoscaler answered HTTP {status}: {reason}")
    return answer


def _what_runs(target: Target, running: DevState | None) -> str:
    """After a connection refused: the autoscaler that does run here, if any."""
    if running is None:
        return (
            " (no `pyworker dev` runs here: start one, or pass the --autoscaler URL of a "
            "running autoscaler)"
        )
    if running.autoscaler.rstrip("/") != target.autoscaler:
        return (
            f" (the running `pyworker dev`'s autoscaler is {running.autoscaler}: leave out "
            f"--autoscaler, or pass --autoscaler {running.autoscaler})"
        )
    return " (it belongs to the running `pyworker dev`: is it stopping?)"


def _waiting_summary(answer: Mapping[str, Any]) -> str:
    counts = [
        f"{answer[key]} {key.removesuffix('_workers')}"
        for key in ("ready_workers", "loading_workers", "errored_workers")
        if isinstance(answer.get(key), int)
    ]
    status = answer.get("status", "no url in the answer")
    return f"{status}: " + ", ".join(counts) + " workers" if counts else str(status)


def worker_body(auth_data: Mapping[str, Any], payload: Any) -> bytes:
    """The body a client sends to the worker."""
    return orjson.dumps({"auth_data": dict(auth_data), "payload": payload, "session_id": None})


def worker_url(auth_data: Mapping[str, Any], route: str) -> str:
    return str(auth_data["url"]).rstrip("/") + (route if route.startswith("/") else "/" + route)


ROUTE_WAIT = 300.0
"""How long the worker clients (workers/*/client.py) wait for a ready worker."""


async def route(
    session: aiohttp.ClientSession, autoscaler: str, endpoint: str, api_key: str, cost: float
) -> dict[str, Any]:
    """The signed auth_data of a ready worker, for the worker clients; waits while none is."""
    return await route_request(
        session, Target(autoscaler.rstrip("/"), endpoint, api_key), cost, ROUTE_WAIT
    )


def unsigned_auth_data(worker: str) -> dict[str, Any]:
    """What an UNSECURED worker accepts: the fields must be there, the signature is not read."""
    fields = {"cost": 0, "endpoint": "local", "reqnum": 0, "request_idx": 0, "signature": ""}
    return fields | {"url": worker}


def add_worker_target_arguments(parser: argparse.ArgumentParser, endpoint: str) -> None:
    """How a worker's client script finds a worker: an autoscaler, or one UNSECURED worker."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--autoscaler", metavar="URL", help="autoscaler base URL, e.g. http://127.0.0.1:8081"
    )
    target.add_argument(
        "--worker", metavar="URL", help="an UNSECURED worker's URL, skipping the autoscaler"
    )
    parser.add_argument(
        "--endpoint", default=endpoint, help=f"endpoint name at the autoscaler (default {endpoint})"
    )
    parser.add_argument("--api-key", default="", help="the endpoint's API key")


async def worker_auth_data(
    session: aiohttp.ClientSession, arguments: argparse.Namespace, cost: float
) -> dict[str, Any]:
    """Signed auth_data from the autoscaler's /route/, or unsigned ones for `--worker`."""
    if arguments.worker:
        return unsigned_auth_data(arguments.worker.rstrip("/")) | {"cost": cost}
    return await route(session, arguments.autoscaler, arguments.endpoint, arguments.api_key, cost)
