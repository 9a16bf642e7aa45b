"""The composition root: the one place that builds a worker's parts and wires them together.

`compose_worker(config, environment)` makes every part once and hands each only the parts it
uses; `Worker` is the handle on them that pyworker.serving.server and the tests hold, and
`create_app` / `create_side_app` make the aiohttp applications from them. No part imports this
module: the request path (pyworker.serving.admission, then pyworker.serving.routes), the drain,
the session routes and the worker's own routes each get their narrow collaborators here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle import outbound
from pyworker.lifecycle.accounting import Ledger
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.lifecycle.in_process import InProcessModel
from pyworker.lifecycle.metrics import RequestMetrics
from pyworker.lifecycle.public_key import KeyFetch, fetch_public_key
from pyworker.lifecycle.readiness import Readiness
from pyworker.lifecycle.reporter import Reporter
from pyworker.lifecycle.state import LifecycleEvent, WorkerStatus
from pyworker.lifecycle.supervision import Supervisor, describe
from pyworker.protocol.auth import SignatureVerifier, Verifier
from pyworker.protocol.strict import StrictVerifier
from pyworker.serving.admin import UPDATE_PATH, update_handler
from pyworker.serving.admission import Admission
from pyworker.serving.drain import Drainable
from pyworker.serving.gate import RouteGate
from pyworker.serving.http_errors import expect_handler, json_errors
from pyworker.serving.inflight import InFlight
from pyworker.serving.limits import body_deadline, quiet_malformed_requests
from pyworker.serving.observability import Observed, register_observability_routes
from pyworker.serving.refusals import refusal_answers
from pyworker.serving.routes import RouteParts, route_handler
from pyworker.serving.session_routes import SessionRoutes
from pyworker.serving.session_routes import create_side_app as session_side_app
from pyworker.serving.sessions import SessionStore
from pyworker.serving.unverified import UnverifiedBytes
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

AppSignal = Callable[[web.Application], Awaitable[None]]
UNVERIFIED_FLOOR = 64 * 1024 * 1024
"""The default budget of unverified body bytes: this, or two of the largest bodies."""


class PublicUrl:
    """The address signatures must name; its port is known once the listener is bound."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def get(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Worker:
    """The parts of one worker process, built by `compose_worker`; it holds them, nothing more."""

    config: WorkerConfig
    environment: Environment
    public_url: PublicUrl
    status: WorkerStatus
    metrics: RequestMetrics
    ledger: Ledger
    verifier: Verifier
    key: KeyFetch
    """How the public key's fetch goes: readiness waits on it."""
    model: ModelClient
    gates: dict[str, RouteGate]
    sessions: SessionStore
    in_flight: InFlight
    unverified: UnverifiedBytes
    """Bytes of request bodies not yet verified, all clients together (serving.unverified)."""
    gpu: GpuMonitor
    in_process: InProcessModel | None
    """The model loaded in the worker's own process (config.lifecycle or setup), if any."""
    readiness: Readiness
    reporter: Reporter
    supervisor: Supervisor
    """Every long-lived task of the worker runs under it (pyworker.lifecycle.supervision)."""
    drainable: Drainable
    """What `pyworker.serving.drain.drain` stops; its hooks run last (the final report)."""

    def create_app(self) -> web.Application:
        return create_app(self)

    def create_side_app(self) -> web.Application:
        return create_side_app(self)

    @property
    def url(self) -> str:
        return self.public_url.value


def compose_worker(
    config: WorkerConfig, environment: Environment, gpu: GpuMonitor | None = None
) -> Worker:
    """Every part of a worker, each given only what it uses."""
    url = PublicUrl(environment.public_url())
    audience = url.get if environment.verify_url else None
    status = WorkerStatus()
    metrics = RequestMetrics(route.path for route in config.routes)
    ledger = Ledger(observer=metrics.observe)
    key = KeyFetch()
    server = config.model_server
    model = ModelClient(
        server.base_url, server.connect_timeout, config.function_threads, server.max_connections
    )
    in_process = InProcessModel.from_config(config, model)
    unload = in_process.unload if in_process is not None else None
    sessions = SessionStore(config.sessions, ledger, model)
    in_flight = InFlight()
    gpu = gpu or GpuMonitor()
    reporter = Reporter(
        environment, status, ledger, url.get, busy_interval=environment.report_interval
    )
    return Worker(
        config=config,
        environment=environment,
        public_url=url,
        status=status,
        verifier=(
            StrictVerifier(audience=audience)
            if environment.strict_auth
            else SignatureVerifier(audience=audience)
        ),
        metrics=metrics,
        ledger=ledger,
        key=key,
        model=model,
        gates={
            route.path: RouteGate(route.concurrency_limit, route.max_queue, route.max_queue_time)
            for route in config.routes
        },
        sessions=sessions,
        in_flight=in_flight,
        unverified=UnverifiedBytes(
            environment.max_unverified_bytes or max(UNVERIFIED_FLOOR, 2 * config.max_body_size)
        ),
        gpu=gpu,
        in_process=in_process,
        readiness=Readiness(
            config,
            status,
            model,
            gpu,
            None if environment.unsecured else key,
            load_deadline=environment.load_deadline,
            in_process=in_process,
        ),
        reporter=reporter,
        supervisor=Supervisor(),
        drainable=Drainable(status, in_flight, sessions, [reporter.final_report], unload),
    )


def create_app(worker: Worker) -> web.Application:
    """The worker's application: the config's routes, the session routes, its own routes.

    Every `Refused` a handler raises (or the body deadline) is answered by `refusal_answers`;
    whatever else escapes, and aiohttp's own errors, by `json_errors`."""
    config = worker.config
    quiet_malformed_requests()
    app = web.Application(
        client_max_size=config.max_body_size,
        middlewares=[
            json_errors,
            refusal_answers(worker.ledger),
            body_deadline(worker.environment.body_timeout),
        ],
    )
    parts = RouteParts(
        _admission(worker), worker.ledger, worker.status, worker.in_flight, worker.model
    )
    expect = expect_handler(config.max_body_size)
    for route in config.routes:
        handler = route_handler(route, worker.gates[route.path], parts)
        app.router.add_post(route.path, handler, expect_handler=expect)
    register_observability_routes(app, _observed(worker))
    _session_routes(worker).register(app)
    app.router.add_post(
        UPDATE_PATH, update_handler(worker.environment), expect_handler=expect_handler(1024)
    )
    app.on_startup.append(_on_startup(worker))
    app.on_cleanup.append(_on_cleanup(worker))
    return app


def create_side_app(worker: Worker) -> web.Application:
    """The plain-HTTP side port's application: `/session/end` and nothing else."""
    return session_side_app(_session_routes(worker))


def _admission(worker: Worker) -> Admission:
    return Admission(
        worker.unverified,
        None if worker.environment.unsecured else worker.verifier,
        worker.sessions,
        worker.status,
        worker.config.max_body_size,
    )


def _session_routes(worker: Worker) -> SessionRoutes:
    return SessionRoutes(_admission(worker), worker.sessions, worker.ledger)


def _observed(worker: Worker) -> Observed:
    return Observed(
        name=worker.config.name,
        environment=worker.environment,
        url=worker.public_url.get,
        status=worker.status,
        ledger=worker.ledger,
        metrics=worker.metrics,
        gates=worker.gates,
        readiness=worker.readiness,
        reporter=worker.reporter,
        gpu=worker.gpu,
    )


# --- the worker's lifetime ------------------------------------------------------------------
def _on_startup(worker: Worker) -> AppSignal:
    """Start the worker's long-lived tasks, each under the supervisor."""
    supervisor, environment = worker.supervisor, worker.environment

    def report_failure(name: str, error: BaseException) -> None:
        """A crashed task the worker cannot serve without: the autoscaler is told why."""
        worker.status.handle(
            LifecycleEvent.TASK_FAILED, f"worker task {name} failed: {describe(error)}"
        )

    async def load_key() -> None:
        async with outbound.session() as session:
            await fetch_public_key(session, environment.report_addr, worker.verifier, worker.key)
        worker.status.public_key_loaded = True

    async def start(app: web.Application) -> None:
        if environment.unsecured:
            logger.warning("UNSECURED: auth_data signatures are not checked")
        else:
            supervisor.supervise("public-key", load_key)
        supervisor.supervise("readiness", worker.readiness.run, on_failure=report_failure)
        supervisor.supervise("reporter", worker.reporter.run)
        supervisor.supervise("session-sweep", worker.sessions.run_sweeps)

    return start


def _on_cleanup(worker: Worker) -> AppSignal:
    """Close the sessions (their close routes still reach the model server), then the rest."""

    async def stop(app: web.Application) -> None:
        await worker.sessions.close_all()
        await worker.supervisor.aclose()
        if worker.in_process is not None:
            await worker.in_process.unload()  # once: a drained worker's is unloaded already
        await worker.model.close()
        await worker.gpu.aclose()

    return stop
