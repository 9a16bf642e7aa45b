"""The bodies a worker and its clients send to the autoscaler, each defined once (docs/protocol.md).

The worker's reporter sends them, the local autoscaler validates them (pyworker.devtools.local
adds pydantic validation to these very classes), and the start report tells the autoscaler why
a worker cannot start. That report must go out even before pyworker is installed, from any
python3 the container has (perhaps one older than pyworker supports): so this module uses the
standard library only, stays importable by Python 3.7, and `scripts/on_start.sh` runs it by
file path, which never imports the `pyworker` package:

    python3 pyworker/protocol/messages.py "why the worker cannot start"

Its `post` is the blocking call of start-up steps (this report, the certificate request). Like
the worker's own calls (pyworker/lifecycle/outbound.py) it never follows a redirect, reads an
answer up to a bound, and has a deadline for the whole call, not for each read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import os
import socket
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

STATUS_PATH = "/worker_status/"
DELETE_REQUESTS_PATH = "/delete_requests/"
PUBKEY_PATH = "/pubkey/"
"""The autoscaler's paths a worker calls: reports, finished requests, its public key."""
DEFAULT_REPORT_ADDR = "https://run.vast.ai"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
MAX_ERROR_MESSAGE = 2000
"""Characters of `error_msg` a start report carries."""
START_REPORT_TIMEOUT = 5.0
MAX_ANSWER = 64 * 1024
"""Bytes of an answer `post` reads by default; the rest is never read."""


@dataclass(frozen=True)
class WorkerStatusReport:
    """`POST /worker_status/`; every field but `id` may be left out (start-up failure reports)."""

    id: int
    mtoken: str | None = None
    version: str = ""
    loadtime: float = 0.0
    cur_load: float = 0.0
    new_load: float = 0.0
    rej_load: float = 0.0
    cur_perf: float = 0.0
    max_perf: float = 0.0
    error_msg: str | None = ""
    num_requests_working: int = 0
    num_requests_recieved: int = 0  # sic: the reference's spelling
    additional_disk_usage: float = 0.0
    working_request_idxs: list[int] = field(default_factory=list)
    cur_capacity: float = 0  # reserved; the reference sends the integer 0
    max_capacity: float = 0
    url: str = ""

    def to_wire(self) -> dict[str, Any]:
        """The JSON object, keys in the reference's order."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinishedItem:
    """One finished request of `/delete_requests/` (times in epoch seconds)."""

    request_idx: int
    success: bool = True
    status: str = ""
    entered_queue_at: float | None = None
    work_started_at: float | None = None
    work_completed_at: float | None = None

    def to_wire(self) -> dict[str, Any]:
        # One of these a finished request: a plain dict is ~30x cheaper than dataclasses.asdict.
        return {key: getattr(self, key) for key in _FINISHED_ITEM_KEYS}


_FINISHED_ITEM_KEYS = tuple(item.name for item in dataclasses.fields(FinishedItem))


@dataclass(frozen=True)
class DeleteRequests:
    """`POST /delete_requests/`: the `requests` list, or the older `request_idxs` + `success`
    (one post per outcome, as vastai 1.9.1 sends)."""

    worker_id: int
    mtoken: str | None = None
    requests: list[FinishedItem] | None = None
    request_idxs: list[int] | None = None
    success: bool = True

    def __post_init__(self) -> None:
        if self.requests is None and self.request_idxs is None:
            raise ValueError("either requests or request_idxs is required")

    def to_wire(self) -> dict[str, Any]:
        """The JSON object in the form it was made in: only that form's keys."""
        head = {"worker_id": self.worker_id, "mtoken": self.mtoken}
        if self.requests is not None:
            return {**head, "requests": [item.to_wire() for item in self.requests]}
        return {**head, "request_idxs": self.request_idxs, "success": self.success}


@dataclass(frozen=True)
class RouteRequest:
    """`POST /route/` from a client; `request_idx` 0 or absent asks for a new one."""

    endpoint: str
    api_key: str = ""
    cost: float = 0.0
    request_idx: int | None = None
    replay_timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.cost >= 0:
            raise ValueError("cost must be a number >= 0")


# --- the start report: why a worker cannot start ---------------------------------------------


def start_report(message: str, environ: Mapping[str, str]) -> WorkerStatusReport:
    """The worker's id, token and public url, no load, and `message` as `error_msg`."""
    try:
        worker_id = int(environ.get("CONTAINER_ID") or 0)
    except ValueError:
        worker_id = 0
    port = environ.get("WORKER_PORT") or "3000"
    public_port = environ.get(f"VAST_TCP_PORT_{port}") or port
    address = environ.get("PUBLIC_IPADDR")
    use_ssl = environ.get("USE_SSL", "").strip().lower() in TRUE_WORDS
    return WorkerStatusReport(
        id=worker_id,
        mtoken=environ.get("MASTER_TOKEN", ""),
        error_msg=message[:MAX_ERROR_MESSAGE],
        url=public_url(address, public_port, use_ssl=use_ssl) if address else "",
    )


def public_url(address: str, port: int | str, *, use_ssl: bool) -> str:
    """The worker's address as the autoscaler hands it to clients (a report's `url`):
    `http[s]://PUBLIC_IPADDR:VAST_TCP_PORT_<WORKER_PORT>`.

    Without PUBLIC_IPADDR the start report sends no url (nothing listens yet), while a running
    worker names its listen address (pyworker.config.environment)."""
    return f"{'https' if use_ssl else 'http'}://{address}:{port}"


def report_start_error(message: str, environ: Mapping[str, str]) -> None:
    """Post the start report to every `REPORT_ADDR` entry; nothing in local mode. Never raises.

    Blocking: for start-up steps that run before the worker (and its reporter) does. It carries
    `MASTER_TOKEN`, so a 3xx is a report not delivered there: the token never goes elsewhere.
    """
    if not environ.get("REPORT_ADDR") and not environ.get("CONTAINER_ID"):
        return
    body = json.dumps(start_report(message, environ).to_wire()).encode()
    for base in (environ.get("REPORT_ADDR") or DEFAULT_REPORT_ADDR).split(","):
        base = base.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            continue
        try:
            status, _ = post(
                base + STATUS_PATH,
                body,
                {"Content-Type": "application/json"},
                timeout=START_REPORT_TIMEOUT,
            )
        except (OSError, ValueError, http.client.HTTPException) as error:
            logger.warning("could not report to %s: %s", base, str(error) or type(error).__name__)
            continue
        if not 200 <= status < 300:
            logger.warning("could not report to %s: %s", base, status_problem(status))


def status_problem(status: int) -> str:
    """What a status other than 2xx says, for a log line or `error_msg`."""
    return f"HTTP {status}" + (" (a redirect, not followed)" if 300 <= status < 400 else "")


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    limit: int = MAX_ANSWER,
) -> tuple[int, bytes]:
    """POST `body`: the answer's status and at most `limit` + 1 bytes of it (one more says it
    was longer; the rest is never read).

    No redirect is followed (http.client follows none, and no proxy is taken from the
    environment, as the worker's own calls take none); the caller treats a 3xx as a failure.
    `timeout` bounds the whole call: a host that answers a byte at a time is cut off at it.
    Raises OSError (TimeoutError past the deadline), http.client.HTTPException or ValueError.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    connection = _connection(parts, timeout)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    expired = threading.Event()
    timer = threading.Timer(timeout, _cut, (connection, expired))
    timer.daemon = True
    timer.start()
    try:
        connection.connect()
        if expired.is_set():  # the deadline passed while connecting, before there was a socket
            raise TimeoutError
        connection.request("POST", target, body=body, headers=dict(headers))
        response = connection.getresponse()
        answer = response.read(limit + 1)
        if expired.is_set():  # cut off while reading: what came is not the whole answer
            raise TimeoutError
        return response.status, answer
    except (OSError, ValueError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError(f"no whole answer within {timeout:g} s") from None
        raise
    finally:
        timer.cancel()
        timer.join()  # the socket is closed only once the timer can no longer touch it
        connection.close()


def _connection(parts: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    host = parts.hostname or ""
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            host, parts.port or 443, timeout=timeout, context=ssl.create_default_context()
        )
    return http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)


def _cut(connection: http.client.HTTPConnection, expired: threading.Event) -> None:
    """At the deadline: end the call, waking a read that waits on the socket."""
    expired.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def main(arguments: Sequence[str]) -> int:
    """`messages.py MESSAGE`: report MESSAGE (any bytes the shell passed) as the start error."""
    if len(arguments) != 1:
        print("usage: python3 pyworker/protocol/messages.py MESSAGE", file=sys.stderr)
        return 2
    logging.basicConfig(format="on_start: %(message)s")
    # A message cut from a log may hold invalid UTF-8: keep the rest of it readable.
    message = arguments[0].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    report_start_error(message, os.environ)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
