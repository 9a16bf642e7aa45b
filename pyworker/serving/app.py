"""The worker: its aiohttp application and the request path of every route.

The request path runs in this order, cheapest and most hostile input first: body size (413)
and time (408, pyworker.serving.limits), body shape (422), signature (401), readiness (503),
admission (429), then the model server.
Only a request that passed the signature check is accounted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pyworker.config import JSONObject, RouteConfig, WorkerConfig
from pyworker.config.encoded_body import EncodedBody, PayloadRefused
from pyworker.config.environment import Environment
from pyworker.lifecycle.accounting import Ledger, Outcome
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.lifecycle.metrics import RequestMetrics
from pyworker.lifecycle.readiness import Readiness
from pyworker.lifecycle.reporter import Reporter
from pyworker.lifecycle.state import WorkerState, WorkerStatus
from pyworker.lifecycle.supervision import FailureHandler, Supervisor, TaskFactory, describe
from pyworker.protocol.auth import SignatureVerifier, Verifier, fetch_public_key
from pyworker.protocol.envelope import EnvelopeError, parse_envelope
from pyworker.protocol.strict import StrictVerifier
from pyworker.protocol.workload import WorkloadError
from pyworker.serving.admin import UPDATE_PATH, update_handler
from pyworker.serving.admission import Refusal, RouteGate
from pyworker.serving.drain import DrainHook
from pyworker.serving.http_errors import expect_handler, json_errors
from pyworker.serving.inflight import InFlight
from pyworker.serving.limits import body_deadline
from pyworker.serving.observability import register_observability_routes
from pyworker.serving.relay import ClientGone, relay, relay_handler
from pyworker.serving.responses import (
    error_response,
    json_response,
    not_ready_refusal,
    signature_refusal,
)
from pyworker.serving.session_routes import SessionRoutes
from pyworker.serving.sessions import SessionStore
from pyworker.serving.unverified import BodyRefused, UnverifiedBytes
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNVERIFIED_FLOOR = 64 * 1024 * 1024
"""The default budget of unverified body bytes: this, or two of the largest bodies."""
CLIENT_CLOSED = 499  # nginx's word for "client closed request"; seen only in our accounting


class Worker:
    """Everything one worker process holds: config, state, accounting and clients."""

    def __init__(
        self, config: WorkerConfig, environment: Environment, gpu: GpuMonitor | None = None
    ) -> None:
        self.config = config
        self.environment = environment
        self.status = WorkerStatus()
        self.metrics = RequestMetrics(route.path for route in config.routes)
        self.ledger = Ledger(observer=self.metrics.observe)
        self.url: str = environment.public_url()
        audience = (lambda: self.url) if environment.verify_url else None
        self.verifier: Verifier = (
            StrictVerifier(audience=audience)
            if environment.strict_auth
            else SignatureVerifier(audience=audience)
        )
        self.key_loaded = asyncio.Event()
        self.model = ModelClient(config.model_server.base_url, config.model_server.connect_timeout)
        self.gates = {
            route.path: RouteGate(route.concurrency_limit, route.max_queue, route.max_queue_time)
            for route in config.routes
        }
        self.sessions = SessionStore(config.sessions, self.ledger, self.model)
        self.in_flight = InFlight()
        self.unverified = UnverifiedBytes(
            environment.max_unverified_bytes or max(UNVERIFIED_FLOOR, 2 * config.max_body_size)
        )
        """Bytes of request bodies not yet verified, all clients together (serving.unverified)."""
        self.drain_hooks: list[DrainHook] = []
        """Awaited once, after the requests in flight, when the worker drains (serving.drain)."""
        self.gpu = gpu or GpuMonitor()
        self.readiness = Readiness(
            config,
            self.status,
            self.model,
            self.gpu,
            None if environment.unsecured else self.key_loaded,
            load_deadline=environment.load_deadline,
        )
        self.reporter = Reporter(
            environment,
            self.status,
            self.ledger,
            lambda: self.url,
            busy_interval=environment.report_interval,
        )
        self.drain_hooks.append(self.reporter.final_report)
        self.supervisor = Supervisor()
        """Every long-lived task of the worker runs under it (`spawn`)."""

    # --- lifecycle ----------------------------------------------------------------------
    def create_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_size,
            middlewares=[json_errors, body_deadline(self.environment.body_timeout)],
        )
        expect = expect_handler(self.config.max_body_size)
        for route in self.config.routes:
            app.router.add_post(route.path, self.route_handler(route), expect_handler=expect)
        app.router.add_get("/health", self.health)
        register_observability_routes(app, self)
        SessionRoutes(self).register(app)
        app.router.add_post(
            UPDATE_PATH, update_handler(self.environment), expect_handler=expect_handler(1024)
        )
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    def spawn(
        self,
        task: TaskFactory | Coroutine[Any, Any, None],
        name: str,
        on_failure: FailureHandler | None = None,
    ) -> None:
        """Run a task for the worker's lifetime under supervision (pyworker.lifecycle.supervision).

        Give a coroutine function to have it restarted with backoff when it crashes; a
        coroutine object runs once. Either way a crash is logged with its traceback.
        """
        self.supervisor.supervise(name, task, on_failure=on_failure)

    def _report_failure(self, name: str, error: BaseException) -> None:
        """A crashed task the worker cannot serve without: the autoscaler is told why."""
        self.status.set_state(WorkerState.ERRORED, f"worker task {name} failed: {describe(error)}")

    def announce_address(self) -> None:
        """Say which address signatures must name: a wrong public address shows here first."""
        if self.environment.unsecured:
            return
        if self.environment.verify_url:
            logger.info(
                "auth_data must be signed for %s (scheme, host and port;"
                " PYWORKER_VERIFY_URL=false accepts any address)",
                self.url,
            )
        else:
            logger.warning(
                "PYWORKER_VERIFY_URL=false: auth_data signed for any worker's address is accepted"
            )

    async def _start(self, app: web.Application) -> None:
        if self.environment.unsecured:
            logger.warning("UNSECURED: auth_data signatures are not checked")
        else:
            self.spawn(self._load_key, "public-key")
        self.spawn(self.readiness.run, "readiness", on_failure=self._report_failure)
        self.spawn(self.reporter.run, "reporter")

    async def _load_key(self) -> None:
        async with aiohttp.ClientSession() as session:
            await fetch_public_key(session, self.environment.report_addr[0], self.verifier)
        self.status.public_key_loaded = True
        self.key_loaded.set()

    async def _stop(self, app: web.Application) -> None:
        await self.supervisor.aclose()
        await self.model.close()
        await self.gpu.aclose()

    # --- routes of the worker itself ----------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return json_response(200, {"ok": True, "state": self.status.state})

    # --- the request path ---------------------------------------------------------------
    def route_handler(self, route: RouteConfig) -> Handler:
        gate = self.gates[route.path]
        max_body = self.config.max_body_size
        ledger, status, verifier = self.ledger, self.status, self.verifier
        unverified = self.unverified
        check_signatures = not self.environment.unsecured

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                body, held = await unverified.read(request, max_body)
            except BodyRefused as refused_body:
                return refused_body.response
            try:
                envelope = parse_envelope(body)
            except EnvelopeError as error:
                return json_response(422, error.body())
            finally:
                del body  # the signature check below does not wait: the budget is free again
                unverified.give_back(held)
            auth = envelope.auth
            session_id = envelope.session_id
            # The auth_data a session was created with is good for that session's requests.
            bound = (
                session_id is not None
                and self.sessions.bound(session_id, envelope.auth_fields) is not None
            )
            if (
                check_signatures
                and not bound
                and (refused := signature_refusal(verifier, auth)) is not None
            ):
                return refused
            session = None
            if session_id is not None:
                session = self.sessions.extend(session_id)
                if session is None:
                    return error_response(410, "invalid session")
            if (refused := not_ready_refusal(status)) is not None:
                return refused
            payload, forwarded = envelope.payload, envelope.payload_bytes
            if route.request_hook is not None:
                try:
                    payload, forwarded = await _apply_request_hook(route, payload, forwarded)
                except ValueError as error:
                    return error_response(422, f"invalid payload: {error}")
                except Exception:
                    logger.exception("request hook of %s failed", route.path)
                    return error_response(500, "the worker's request hook failed")
            encoded: EncodedBody | None = None
            if route.body_encoder is not None:
                try:
                    encoded = await _call(route.body_encoder, payload)
                except PayloadRefused as error:
                    return json_response(error.status, error.body())
                except Exception:
                    logger.exception("body encoder of %s failed", route.path)
                    return error_response(500, "the worker's body encoder failed")
            try:
                workload = route.compute_workload(payload, auth.cost)
            except WorkloadError as error:
                return json_response(422, {"error": "invalid request", **error.fields()})
            refusal = gate.refuse(workload, status.max_perf)
            if refusal is not None:
                ledger.reject(auth.request_idx, route.path, workload, 429)
                return _refused(refusal, gate, status.max_perf)

            record = ledger.receive(auth.request_idx, route.path, workload)
            self.in_flight.enter(session)  # from here a drain waits for it, a session close cuts it
            outcome, code = Outcome.ERROR, 500
            try:
                async with gate.slot(workload):
                    ledger.start(record)
                    if route.handler is not None:
                        relayed = await relay_handler(
                            self.model,
                            route.handler,
                            payload,
                            route.read_timeout,
                            route.response_hook,
                        )
                    else:
                        relayed = await relay(
                            self.model,
                            request,
                            route.model_path,
                            forwarded if encoded is None else encoded,
                            route.read_timeout,
                            route.response_hook,
                        )
                code = relayed.status
                outcome = Outcome.SUCCESS if code < 400 else Outcome.ERROR
                return relayed.response
            except UpstreamError as error:
                code = error.status
                return error_response(error.status, error.message)
            except ClientGone:
                outcome, code = Outcome.CANCELLED, CLIENT_CLOSED
                return web.Response(status=CLIENT_CLOSED)
            except asyncio.CancelledError:
                outcome, code = Outcome.CANCELLED, CLIENT_CLOSED
                raise
            except Exception:
                logger.exception("request on %s failed inside the worker", route.path)
                return error_response(500, "internal error in the worker")
            finally:
                self.in_flight.leave()
                ledger.finish(record, outcome, code)

        return handle


async def _apply_request_hook(
    route: RouteConfig, payload: JSONObject, forwarded: bytes
) -> tuple[JSONObject, bytes]:
    """The hook's payload and the bytes to forward: the client's own when the hook left the
    payload as it was (one that only reads it, or unwraps nothing), so that numbers past 64
    bits and the client's spelling reach the model server as sent."""
    assert route.request_hook is not None
    before = orjson.dumps(payload) if route.body_encoder is None else b""
    hooked = await _call(route.request_hook, payload)
    if route.body_encoder is not None:
        return hooked, b""  # the encoder makes the body from the payload
    after = orjson.dumps(hooked)
    return hooked, forwarded if after == before else after


async def _call(hook: Callable[[Any], Any], value: Any) -> Any:
    result = hook(value)
    return await result if inspect.isawaitable(result) else result


def _refused(refusal: Refusal, gate: RouteGate, perf: float) -> web.Response:
    wait = gate.workload / perf if perf > 0 else None
    return error_response(429, refusal.value, retry_after=wait or 1.0, estimated_wait=wait)
