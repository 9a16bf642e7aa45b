"""The routes of the config: a request from admission to the model server's answer.

A request passes admission first (pyworker.serving.pipeline: body, envelope, signature,
session, readiness), then its route's request hook and body encoder (422 for a payload they
refuse), its workload (422), and its gate (429). Only then is it accounted (received,
started, finished) and relayed to the model server (pyworker.serving.relay over
pyworker.upstream.model), or answered by the route's function in the worker's own process.
A request whose client hangs up is accounted Cancelled with 499.
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
from pyworker.serving.admission import Refusal, RouteGate
from pyworker.serving.inflight import InFlight
from pyworker.serving.pipeline import Pipeline
from pyworker.serving.relay import ClientGone, relay, relay_function, relay_handler
from pyworker.serving.responses import error_response, json_response
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.functions import FunctionFailed
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_CLOSED = 499  # nginx's word for "client closed request"; seen only in our accounting


@dataclass(frozen=True, slots=True)
class RouteParts:
    """What every route's handler uses besides its own gate."""

    pipeline: Pipeline
    ledger: Ledger
    status: WorkerStatus
    in_flight: InFlight
    model: ModelClient


def route_handler(route: RouteConfig, gate: RouteGate, parts: RouteParts) -> Handler:
    """The aiohttp handler of `route`: everything it uses is bound here, once."""
    admit, path = parts.pipeline.admit, route.path
    ledger, in_flight, model = parts.ledger, parts.in_flight, parts.model
    model_path, read_timeout, hook = route.model_path, route.read_timeout, route.response_hook
    prepares = route.request_hook is not None or route.body_encoder is not None

    async def handle(request: web.Request) -> web.StreamResponse:
        admitted = await admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        envelope, session = admitted
        payload = envelope.payload
        forwarded: bytes | EncodedBody = envelope.payload_bytes
        if prepares:
            prepared = await _prepare(route, payload, envelope.payload_bytes)
            if isinstance(prepared, web.Response):
                return prepared
            payload, forwarded = prepared
        workload = _admit_workload(route, gate, parts, payload, envelope.auth)
        if isinstance(workload, web.Response):
            return workload

        record = ledger.receive(envelope.auth.request_idx, path, workload)
        in_flight.enter(session)  # from here a drain waits for it, a session close cuts it
        outcome, code = Outcome.ERROR, 500
        try:
            async with gate.slot(workload):
                ledger.start(record)
                if route.function is not None:
                    relayed = await relay_function(model, request, route, payload)
                elif route.handler is not None:
                    relayed = await relay_handler(model, route.handler, payload, read_timeout, hook)
                else:
                    relayed = await relay(model, request, model_path, forwarded, read_timeout, hook)
            code = relayed.status
            outcome = Outcome.SUCCESS if code < 400 else Outcome.ERROR
            return relayed.response
        except (UpstreamError, FunctionFailed) as error:
            code = error.status
            return error_response(error.status, error.message)
        except ClientGone:
            outcome, code = Outcome.CANCELLED, CLIENT_CLOSED
            return web.Response(status=CLIENT_CLOSED)
        except asyncio.CancelledError:
            outcome, code = Outcome.CANCELLED, CLIENT_CLOSED
            raise
        except Exception:
            logger.exception("request on %s failed inside the worker", path)
            return error_response(500, "internal error in the worker")
        finally:
            in_flight.leave()
            ledger.finish(record, outcome, code)

    return handle


def _admit_workload(
    route: RouteConfig, gate: RouteGate, parts: RouteParts, payload: JSONObject, auth: AuthData
) -> float | web.Response:
    """The request's workload if its gate lets it in: 422 when the payload has none, else 429
    (accounted as rejected) when the gate is full or its queue would wait too long."""
    try:
        workload = route.compute_workload(payload, auth.cost)
    except WorkloadError as error:
        return json_response(422, {"error": "invalid request", **error.fields()})
    perf = parts.status.max_perf
    refusal = gate.refuse(workload, perf)
    if refusal is None:
        return workload
    parts.ledger.reject(auth.request_idx, route.path, workload, 429)
    return _refused(refusal, gate, perf)


async def _prepare(
    route: RouteConfig, payload: JSONObject, forwarded: bytes
) -> tuple[JSONObject, bytes | EncodedBody] | web.Response:
    """The payload after the route's request hook and what to forward: the client's bytes, the
    hook's payload re-encoded, or the body encoder's body; else the answer saying why not."""
    if route.request_hook is not None:
        try:
            payload, forwarded = await _apply_request_hook(route, payload, forwarded)
        except ValueError as error:
            return error_response(422, f"invalid payload: {error}")
        except Exception:
            logger.exception("request hook of %s failed", route.path)
            return error_response(500, "the worker's request hook failed")
    if route.body_encoder is None:
        return payload, forwarded
    try:
        encoded: EncodedBody = await call_hook(route.body_encoder, payload)
    except PayloadRefused as error:
        return json_response(error.status, error.body())
    except Exception:
        logger.exception("body encoder of %s failed", route.path)
        return error_response(500, "the worker's body encoder failed")
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


def _refused(refusal: Refusal, gate: RouteGate, perf: float) -> web.Response:
    wait = gate.workload / perf if perf > 0 else None
    return error_response(429, refusal.value, retry_after=wait or 1.0, estimated_wait=wait)
