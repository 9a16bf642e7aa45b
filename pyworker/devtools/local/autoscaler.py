"""A local stand-in for Vast.ai's autoscaler (https://run.vast.ai), for local runs and tests.

It speaks the part of the autoscaler's protocol that workers and clients touch: it signs
`/route/` answers with its own RSA key (served at `/pubkey/`) exactly as the real one does,
and by default strictly too (pyworker.protocol.strict: `expires`, `sig_v`,
`strict_signature`, which a worker run with PYWORKER_STRICT_AUTH=true requires and a
reference worker ignores),
routes to the ready worker with the least load per unit of perf, and records what workers send
to `/worker_status/` and `/delete_requests/`. It does not start or stop workers: it serves the
ones that report to it.

What it recorded is served as JSON at `/fleet` and as a live page at `/`.

    python -m pyworker.devtools.local.autoscaler --port 8081 --watch
    REPORT_ADDR=http://127.0.0.1:8081 pyworker run ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from pyworker.devtools.listen import run_server, server_parser
from pyworker.devtools.local.dashboard import DASHBOARD_HTML, FLEET_PATH
from pyworker.devtools.local.fleet import FinishedRequest, Fleet, WorkerPhase, WorkerRecord
from pyworker.devtools.local.messages import DELETE_REQUESTS, ROUTE_REQUEST, WORKER_REPORT
from pyworker.devtools.local.table import LiveTable, watch
from pyworker.protocol.keys import PrivateKey
from pyworker.protocol.messages import DELETE_REQUESTS_PATH, PUBKEY_PATH, STATUS_PATH
from pyworker.protocol.signing import SigningKey
from pyworker.protocol.strict import SignedRequest, strict_fields

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8081
STRICT_LIFETIME = 60.0
"""Seconds a strict `/route/` answer stays valid: time enough to reach the worker."""


class Refused(Exception):
    """A request the autoscaler answers with an error status and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LocalAutoscaler:
    """The autoscaler's state and logic, usable in-process or served over HTTP with `start()`.

    `endpoint` None accepts any endpoint name; `api_key` and `master_token` are checked only
    when set. Generating the key takes a fraction of a second: pass `key` to reuse one.
    `strict` adds the strict signature (valid `strict_lifetime` seconds) to every answer.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        api_key: str | None = None,
        master_token: str | None = None,
        key: SigningKey | None = None,
        fleet: Fleet | None = None,
        strict: bool = True,
        strict_lifetime: float = STRICT_LIFETIME,
    ) -> None:
        self.endpoint = endpoint
        self.strict = strict
        self.strict_lifetime = strict_lifetime
        self.api_key = api_key
        self.master_token = master_token
        self.key = key or SigningKey.generate()
        self.fleet = fleet or Fleet()
        self._reqnums = itertools.count(1)
        self._next_request_idx = 1
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def private_key(self) -> PrivateKey:
        return self.key.private_key

    @property
    def public_pem(self) -> bytes:
        return self.key.public_pem

    def sign(self, url: str) -> str:
        return self.key.sign(url)

    # -- what clients and workers ask --------------------------------------------------------

    def route(
        self,
        endpoint: str | None = None,
        cost: float = 0.0,
        request_idx: int | None = None,
        api_key: str = "",
    ) -> dict[str, Any]:
        """The `/route/` answer: signed auth_data for a ready worker, or a waiting status."""
        name = endpoint if endpoint is not None else (self.endpoint or "")
        if self.endpoint is not None and name != self.endpoint:
            served = f"this autoscaler serves {self.endpoint!r}"
            raise Refused(404, f"unknown endpoint {name!r}: {served}")
        if self.api_key is not None and not _same(api_key, self.api_key):
            raise Refused(401, "invalid api_key")
        request_idx = self._request_idx(request_idx)
        worker = self.fleet.choose(cost)
        if worker is None:
            counts = self.fleet.phase_counts()
            return {
                "endpoint": name,
                "request_idx": request_idx,
                "status": "waiting",
                "ready_workers": counts[WorkerPhase.READY],
                "loading_workers": counts[WorkerPhase.LOADING],
                "errored_workers": counts[WorkerPhase.ERRORED],
                "draining_workers": counts[WorkerPhase.DRAINING],
                "stale_workers": counts[WorkerPhase.STALE],
            }
        url = worker.report.url
        logger.debug("request %d routed to worker %d", request_idx, worker.id)
        reqnum = next(self._reqnums)
        answer: dict[str, Any] = {
            "url": url,
            "reqnum": reqnum,
            "request_idx": request_idx,
            "endpoint": name,
            "cost": cost,
            "signature": self.sign(url),
            "__request_id": uuid.uuid4().hex,
        }
        if self.strict:
            expires = round(time.time() + self.strict_lifetime)
            request = SignedRequest.from_fields(answer | {"expires": expires})
            answer |= strict_fields(self.private_key, request)
        return answer

    def record_status(self, body: object) -> WorkerRecord:
        """Record a `/worker_status/` body; ValidationError if malformed, Refused on a bad token."""
        report = WORKER_REPORT.validate_python(body)
        self._check_token(report.mtoken)
        raw = body if isinstance(body, dict) else report.to_wire()
        return self.fleet.record_status(report, raw)

    def record_finished(self, body: object) -> list[FinishedRequest]:
        """Record a `/delete_requests/` body, in either form."""
        message = DELETE_REQUESTS.validate_python(body)
        self._check_token(message.mtoken)
        return self.fleet.record_finished(message)

    @property
    def reports(self) -> dict[int, dict[str, Any]]:
        """Each worker's latest report, as sent but without its token."""
        return {worker_id: record.raw_report for worker_id, record in self.fleet.workers.items()}

    @property
    def finished(self) -> list[FinishedRequest]:
        return list(self.fleet.finished)

    def snapshot(self, history: int | None = None) -> dict[str, Any]:
        """What `/fleet` answers; `history` limits the samples per worker (0: none)."""
        return {"endpoint": self.endpoint, **self.fleet.snapshot(history)}

    def _request_idx(self, given: int | None) -> int:
        # The real client sends 0 until it was given an index; any other value keeps its place.
        if given:
            self._next_request_idx = max(self._next_request_idx, given + 1)
            return given
        given = self._next_request_idx
        self._next_request_idx += 1
        return given

    def _check_token(self, mtoken: str | None) -> None:
        if self.master_token is not None and not _same(mtoken or "", self.master_token):
            raise Refused(401, "invalid mtoken")

    # -- serving --------------------------------------------------------------------------------

    def create_app(self) -> web.Application:
        return create_app(self)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on `host:port` (0: a free port); returns the base url."""
        runner = web.AppRunner(self.create_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = next(
            (address[1] for address in runner.addresses if isinstance(address, tuple)), port
        )
        shown_host = f"[{host}]" if ":" in host else host
        self._url = f"http://{shown_host}:{bound}"
        return self._url

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the autoscaler is not started")
        return self._url

    @property
    def pubkey_url(self) -> str:
        return self.url + PUBKEY_PATH

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._url = None

    async def __aenter__(self) -> LocalAutoscaler:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


# -- HTTP ---------------------------------------------------------------------------------------

AUTOSCALER_KEY = web.AppKey("local_autoscaler", LocalAutoscaler)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise Refused(400, "the body is not valid JSON") from None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals and invalid bodies become JSON errors: nothing a client sends yields a 500."""
    try:
        response = await handler(request)
    except Refused as refusal:
        return _json({"ok": False, "error": refusal.message}, status=refusal.status)
    except ValidationError as error:
        detail = error.errors(include_url=False, include_context=False, include_input=False)
        return _json({"ok": False, "error": "invalid body", "detail": detail}, status=400)
    return response


async def _pubkey(request: web.Request) -> web.Response:
    return web.Response(body=request.app[AUTOSCALER_KEY].public_pem, content_type="text/plain")


async def _route(request: web.Request) -> web.Response:
    autoscaler = request.app[AUTOSCALER_KEY]
    message = ROUTE_REQUEST.validate_python(await _body(request))
    api_key = message.api_key or _bearer(request) or request.query.get("api_key", "")
    answer = autoscaler.route(message.endpoint, message.cost, message.request_idx, api_key)
    return _json(answer)


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _worker_status(request: web.Request) -> web.Response:
    request.app[AUTOSCALER_KEY].record_status(await _body(request))
    return _json({"ok": True})


async def _delete_requests(request: web.Request) -> web.Response:
    entries = request.app[AUTOSCALER_KEY].record_finished(await _body(request))
    return _json({"ok": True, "recorded": len(entries)})


async def _fleet(request: web.Request) -> web.Response:
    history: int | None = None
    if "history" in request.query:
        try:
            history = max(int(request.query["history"]), 0)
        except ValueError:
            raise Refused(400, "history must be an integer") from None
    return _json(request.app[AUTOSCALER_KEY].snapshot(history))


async def _dashboard(request: web.Request) -> web.Response:
    return web.Response(text=DASHBOARD_HTML, content_type="text/html")


def create_app(autoscaler: LocalAutoscaler | None = None) -> web.Application:
    """The autoscaler's HTTP application (a new `LocalAutoscaler` if none is given)."""
    app = web.Application(middlewares=[_errors])
    app[AUTOSCALER_KEY] = autoscaler or LocalAutoscaler()
    app.router.add_get("/", _dashboard)
    app.router.add_get(FLEET_PATH, _fleet)
    app.router.add_get(PUBKEY_PATH, _pubkey)
    app.router.add_get(PUBKEY_PATH.rstrip("/"), _pubkey)
    app.router.add_post("/route/", _route)
    app.router.add_post(STATUS_PATH, _worker_status)
    app.router.add_post(DELETE_REQUESTS_PATH, _delete_requests)
    return app


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = server_parser(
        "python -m pyworker.devtools.local.autoscaler",
        "A local stand-in for Vast.ai's autoscaler: routes, signs and records.",
        port=DEFAULT_PORT,
    )
    parser.add_argument("--endpoint", help="the only endpoint name accepted (default: any)")
    parser.add_argument("--api-key", help="require this api_key on /route/ (default: none)")
    parser.add_argument("--master-token", help="require this mtoken in reports (default: none)")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=30.0,
        help="seconds without a report before a worker gets no more requests (0: never)",
    )
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help="sign only as Vast.ai does today, without the strict signature (docs/security.md)",
    )
    parser.add_argument("--watch", action="store_true", help="show a live table of the workers")
    parser.add_argument("--log-level", default="INFO")
    return parser


async def serve(autoscaler: LocalAutoscaler, host: str, port: int, show_table: bool) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    url = await autoscaler.start(host, port)
    try:
        lines = (
            f"local autoscaler listening on {url}",
            f"public key: {autoscaler.pubkey_url}",
            f"dashboard: {url}/",
            f"workers report to it with REPORT_ADDR={url}",
        )
        await asyncio.to_thread(print, "\n".join(lines), flush=True)
        if show_table:
            await watch(url, LiveTable(), stop=stop)
        await stop.wait()
    finally:
        await autoscaler.stop()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(arguments.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stale_after = arguments.stale_after if arguments.stale_after > 0 else None
    autoscaler = LocalAutoscaler(
        arguments.endpoint,
        api_key=arguments.api_key,
        master_token=arguments.master_token,
        fleet=Fleet(stale_after=stale_after),
        strict=not arguments.reference_only,
    )
    with contextlib.suppress(KeyboardInterrupt):
        serving = serve(autoscaler, arguments.host, arguments.port, arguments.watch)
        return run_server(serving, "local autoscaler")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
