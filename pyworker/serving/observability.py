"""The worker's own GET routes: `/health` and `/ready` for probes, `/status` for people,
`/metrics` for scrapers.

These never touch the model server: they read what the worker already holds, plus one NVML
sample taken off the event loop. Without `MASTER_TOKEN` a client sees the state and readiness
only (pyworker.serving.access); the details need the token.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pyworker import __version__
from pyworker.config.environment import Environment
from pyworker.lifecycle.accounting import Ledger, Outcome
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.lifecycle.metrics import Exposition, RequestMetrics, scaled
from pyworker.lifecycle.readiness import Readiness
from pyworker.lifecycle.reporter import Reporter
from pyworker.lifecycle.state import WorkerState, WorkerStatus
from pyworker.serving import refusals
from pyworker.serving.access import Access, MasterToken
from pyworker.serving.gate import RouteGate
from pyworker.serving.responses import json_response

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Observed:
    """What the worker's own routes read: they change nothing."""

    name: str
    environment: Environment
    url: Callable[[], str]
    status: WorkerStatus
    ledger: Ledger
    metrics: RequestMetrics
    gates: Mapping[str, RouteGate]
    readiness: Readiness
    reporter: Reporter
    gpu: GpuMonitor


def register_observability_routes(app: web.Application, worker: Observed) -> None:
    token = MasterToken(worker.environment)

    async def health(request: web.Request) -> web.Response:
        return json_response(200, {"ok": True, "state": worker.status.state})

    async def ready(access: Access) -> web.Response:
        status = worker.status
        body: dict[str, Any] = {"ready": status.ready, "state": str(status.state)}
        if access is Access.OPERATOR:
            body["error"] = status.error_msg
        return json_response(200 if status.ready else 503, body)

    async def status(access: Access) -> web.Response:
        if access is Access.ANONYMOUS:
            return json_response(200, public_status(worker))
        return json_response(200, await status_document(worker))

    async def metrics(access: Access) -> web.Response:
        if access is Access.ANONYMOUS:
            raise refusals.metrics_need_token()
        text = await metrics_text(worker)
        return web.Response(text=text, headers={"Content-Type": PROMETHEUS_TYPE})

    app.router.add_get("/health", health)
    app.router.add_get("/ready", _checked(token, ready))
    app.router.add_get("/status", _checked(token, status))
    app.router.add_get("/metrics", _checked(token, metrics))


def _checked(
    token: MasterToken, handler: Callable[[Access], Awaitable[web.Response]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A route that refuses a token not ours and tells `handler` what the request may see."""

    async def checked(request: web.Request) -> web.Response:
        return await handler(token.access(request))

    return checked


def public_status(worker: Observed) -> dict[str, Any]:
    """What anyone may see: the state and whether the worker is ready."""
    return {"state": str(worker.status.state), "ready": worker.status.ready}


async def status_document(worker: Observed) -> dict[str, Any]:
    """Everything a person debugging a worker wants, in one answer."""
    status, ledger, readiness = worker.status, worker.ledger, worker.readiness
    samples = await worker.gpu.asample()
    follower = readiness.follower
    reporter = worker.reporter
    return {
        "version": __version__,
        "name": worker.name,
        "url": worker.url(),
        "state": str(status.state),
        "ready": status.ready,
        "error_msg": status.error_msg,
        "uptime": time.monotonic() - status.started_at,
        "loadtime": status.loadtime,
        "max_perf": status.max_perf,
        "public_key_loaded": status.public_key_loaded or worker.environment.unsecured,
        "benchmark": readiness.benchmark.to_dict() if readiness.benchmark else None,
        "gpu": {
            "inventory": readiness.inventory.to_dict(),
            "last_samples": [sample.to_dict() for sample in samples],
        },
        "log": follower.stats.to_dict() if follower else None,
        "error_lines": readiness.error_lines,
        "routes": {
            path: {
                "active": gate.active,
                "waiting": gate.waiting,
                "workload": gate.workload,
                "outcomes": {str(k): v for k, v in worker.metrics.routes[path].outcomes.items()},
            }
            for path, gate in worker.gates.items()
        },
        "requests": {
            "in_progress": ledger.in_progress,
            "current_load": ledger.current_load,
            "working_request_idxs": ledger.working_request_idxs()[:100],
            "finished_awaiting_report": ledger.finished_waiting,
            "finished_dropped": ledger.dropped_finished,
            "totals": {str(k): v for k, v in ledger.totals.items()},
        },
        "reporter": {
            "addresses": list(worker.environment.report_addr),
            "sent": reporter.sent_reports,
            "failed": reporter.failed_reports,
            "last_report": reporter.last_report,
        },
    }


async def metrics_text(worker: Observed) -> str:

    out = Exposition()
    routes = worker.metrics.routes
    out.family("pyworker_requests_total", "counter", "Requests finished, by route and outcome.")
    for path, figures in routes.items():
        for outcome in Outcome:
            out.sample(
                "pyworker_requests_total",
                figures.outcomes[outcome],
                route=path,
                outcome=str(outcome),
            )
    out.family(
        "pyworker_request_duration_seconds",
        "histogram",
        "Time from receipt to the last byte relayed, by route (rejected requests excluded).",
    )
    for path, figures in routes.items():
        out.histogram("pyworker_request_duration_seconds", figures.latency, route=path)
    out.family("pyworker_workload_received_total", "counter", "Workload admitted, by route.")
    for path, figures in routes.items():
        out.sample("pyworker_workload_received_total", figures.workload_received, route=path)
    out.family("pyworker_workload_served_total", "counter", "Workload served, by route.")
    for path, figures in routes.items():
        out.sample("pyworker_workload_served_total", figures.workload_served, route=path)
    out.family("pyworker_queue_depth", "gauge", "Requests waiting for a slot, by route.")
    for path, gate in worker.gates.items():
        out.sample("pyworker_queue_depth", gate.waiting, route=path)
    out.family("pyworker_in_flight", "gauge", "Requests admitted and not finished.")
    out.sample("pyworker_in_flight", worker.ledger.in_progress)
    out.family("pyworker_current_load", "gauge", "Workload of the requests in progress.")
    out.sample("pyworker_current_load", worker.ledger.current_load)
    out.family("pyworker_state", "gauge", "1 for the worker's current state.")
    for state in WorkerState:
        out.sample("pyworker_state", 1 if worker.status.state is state else 0, state=str(state))
    out.family("pyworker_max_perf", "gauge", "Benchmark throughput, workload units per second.")
    out.sample("pyworker_max_perf", worker.status.max_perf)
    out.family("pyworker_build_info", "gauge", "Always 1; the labels say what runs.")
    out.sample("pyworker_build_info", 1, version=__version__, python=platform.python_version())
    samples = await worker.gpu.asample()
    for name, attribute, scale, help_text in GPU_GAUGES:
        values = [(s.index, getattr(s, attribute)) for s in samples]
        present = [(index, value) for index, value in values if value is not None]
        if present:
            out.family(name, "gauge", help_text)
            for index, value in present:
                out.sample(name, scaled(value, scale), gpu=str(index))
    return out.text()


GPU_GAUGES = (
    # name, GpuSample attribute, factor to the base unit, help
    ("pyworker_gpu_utilization_ratio", "utilization_percent", 0.01, "GPU busy, 0 to 1."),
    ("pyworker_gpu_memory_used_bytes", "memory_used_bytes", 1, "GPU memory in use."),
    ("pyworker_gpu_power_watts", "power_watts", 1, "GPU power draw."),
    ("pyworker_gpu_temperature_celsius", "temperature_celsius", 1, "GPU temperature."),
    ("pyworker_gpu_sm_clock_hertz", "sm_clock_mhz", 1e6, "GPU SM clock."),
)
