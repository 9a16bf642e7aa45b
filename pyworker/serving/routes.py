"""The routes of the config: a request from admission to the model server's answer.

A request passes admission first (pyworker.serving.admission: body, envelope, signature,
session, readiness), then its route's request hook and body encoder, its workload, and its gate;
any of them refuses by raising `Refused` (pyworker.serving.refusals), answered by one
middleware. Only then is it accounted (received, started, finished) and relayed to the model
server (pyworker.serving.relay over pyworker.upstream.model), or answered by the route's
function in the worker's own process. A request whose client hangs up is accounted Cancelled
with 499.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from pyworker.config import JSONObject, RouteConfig
from pyworker.config.encoded_body import EncodedBody, PayloadRefused
from pyworker.config.hooks import call_hook
from pyworker.lifecycle.accounting import Ledger, Outcome
from pyworker.lifecycle.state import WorkerStatus
from pyworker.protocol.auth import AuthData
from pyworker.protocol.workload import WorkloadError
from pyworker.serving import refusals
from pyworker.serving.admission import Admission
from pyworker.serving.gate import RouteGate
from pyworker.serving.inflight import InFlight
from pyworker.serving.refusals import Refused
from pyworker.serving.relay import ClientGone, relay_route
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_CLOSED = 499  # nginx's word for "client closed request"; seen only in our accounting


@dataclass(frozen=True, slots=True)
class RouteParts:
    """What every route's handler uses besides its own gate."""

    admission: Admission
    ledger: Ledger
    status: WorkerStatus
    in_flight: InFlight
    model: ModelClient


def route_handler(route: RouteConfig, gate: RouteGate, parts: RouteParts) -> Handler:
    """The aiohttp handler of `route`: everything it uses is bound here, once."""
    admit, path = parts.admission.admit, route.path
    ledger, in_flight, model, status = parts.ledger, parts.in_flight, parts.model, parts.status
    prepares = route.request_hook is not None or route.body_encoder is not None

    async def handle(request: web.Request) -> web.StreamResponse:
        envelope, session = await admit(request)
        auth, payload = envelope.auth, envelope.payload
        forwarded: bytes | EncodedBody = envelope.payload_bytes
        if prepares:
            payload, forwarded = await _prepare(route, payload, envelope.payload_bytes)
        workload = _workload(route, payload, auth)
        _pass_gate(gate, workload, status.max_perf, auth.request_idx, path)

        record = ledger.receive(auth.request_idx, path, workload)
        in_flight.enter(session)  # from here a drain waits for it, a session close cuts it
        outcome, http_status = Outcome.ERROR, 500
        try:
            async with gate.slot(workload):
                ledger.start(record)
                relayed = await relay_route(model, request, route, payload, forwarded)
            http_status = relayed.http_status
            outcome = Outcome.SUCCESS if http_status < 400 else Outcome.ERROR
            return relayed.response
        except Refused as refused:  # no answer from the model server or the function
            http_status = refused.http_status
            raise
        except ClientGone:
            outcome, http_status = Outcome.CANCELLED, CLIENT_CLOSED
            return web.Response(status=CLIENT_CLOSED)
        except asyncio.CancelledError:
            outcome, http_status = Outcome.CANCELLED, CLIENT_CLOSED
            raise
        except Exception:
            logger.exception("request on %s failed inside the worker", path)
            raise refusals.internal_error() from None
        finally:
            in_flight.leave()
            ledger.finish(record, outcome, http_status)

    return handle


def _workload(route: RouteConfig, payload: JSONObject, auth: AuthData) -> float:
    """The request's workload; `Refused` when the payload has none."""
    try:
        return route.compute_workload(payload, auth.cost)
    except WorkloadError as error:
        raise refusals.invalid_workload(error) from None


def _pass_gate(gate: RouteGate, workload: float, perf: float, request_idx: int, path: str) -> None:
    """`Refused`, counted as rejected load, when the gate is full or its queue would wait too
    long (the estimate is the route's admitted workload over the measured throughput)."""
    reason = gate.refuse(workload, perf)
    if reason is not None:
        wait = gate.workload / perf if perf > 0 else None
        rejection = refusals.Rejection(request_idx, path, workload)
        raise refusals.gate_full(reason.value, wait, rejection)


async def _prepare(
    route: RouteConfig, payload: JSONObject, forwarded: bytes
) -> tuple[JSONObject, bytes | EncodedBody]:
    """The payload after the route's request hook and what to forward: the client's bytes, the
    hook's payload re-encoded, or the body encoder's body; `Refused` when they will not."""
    if route.request_hook is not None:
        try:
            payload, forwarded = await _apply_request_hook(route, payload, forwarded)
        except ValueError as error:
            raise refusals.payload_refused_by_hook(error) from None
        except Exception:
            logger.exception("request hook of %s failed", route.path)
            raise refusals.hook_failed() from None
    if route.body_encoder is None:
        return payload, forwarded
    try:
        encoded: EncodedBody = await call_hook(route.body_encoder, payload)
    except PayloadRefused as error:
        raise refusals.payload_not_encodable(error.status, error.message, error.fields) from None
    except Exception:
        logger.exception("body encoder of %s failed", route.path)
        raise refusals.encoder_failed() from None
    return payload, encoded


async def _apply_request_hook(
    route: RouteConfig, payload: JSONObject, forwarded: bytes
) -> tuple[JSONObject, bytes]:
    """The hook's payload and the bytes to forward: the client's own when the hook left the
    payload as it was (one that only reads it, or unwraps nothing), so that numbers past 64
    bits and the client's spelling reach the model server as sent."""
    assert route.request_hook is not None
    before = orjson.dumps(payload) if route.body_encoder is None else b""
    hooked = await call_hook(route.request_hook, payload)
    if route.body_encoder is not None:
        return hooked, b""  # the encoder makes the body from the payload
    after = orjson.dumps(hooked)
    return hooked, forwarded if after == before else after
