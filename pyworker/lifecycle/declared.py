"""What an engine declares it serves at once: the ramp's ceiling, and part of what a cached
figure holds for (docs/benchmark.md, "The cache")."""

from __future__ import annotations

import asyncio
import logging

import orjson

from pyworker import backports
from pyworker.config import BenchmarkConfig, LimitProbe, RouteConfig
from pyworker.config.worker import MAX_BENCHMARK_CONCURRENCY
from pyworker.upstream.errors import UpstreamError
from pyworker.upstream.model import ModelClient

logger = logging.getLogger(__name__)

LIMIT_PROBE_TIMEOUT = 5.0


async def probe_declared(
    model: ModelClient, route: RouteConfig, config: BenchmarkConfig
) -> int | None:
    """What the engine declares it serves at once, where the benchmark asks it (not on a FIFO
    route, which is measured at one in flight whatever the engine says)."""
    if route.fifo or config.limit_probe is None:
        return None
    return await declared_limit(model, config.limit_probe)


async def declared_limit(model: ModelClient, probe: LimitProbe) -> int | None:
    """The engine's own number of requests served at once, or None when it does not say."""
    try:
        async with backports.timeout(LIMIT_PROBE_TIMEOUT), model.get(probe.path) as answer:
            body = await answer.read()
            status = answer.status
    # asyncio.TimeoutError: the time limit's on Python 3.10, where it is not TimeoutError.
    except (UpstreamError, TimeoutError, asyncio.TimeoutError) as error:
        logger.info("benchmark: %s unread (%s)", probe.path, error.__class__.__name__)
        return None
    value: object = None
    if status == 200:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            value = None
        for name in probe.field.split("."):
            value = value.get(name) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        logger.info("benchmark: %s gave no %s (HTTP %d)", probe.path, probe.field, status)
        return None
    return min(value, MAX_BENCHMARK_CONCURRENCY)


def limit_connections(model: ModelClient, config: BenchmarkConfig, declared: int | None) -> None:
    """Where the engine serves each connection with a thread of its own (its probe says
    `spare_connections`), hold the worker's connections to it to the threads it has."""
    probe = config.limit_probe
    if declared is None or probe is None or probe.spare_connections is None:
        return
    limit = declared + probe.spare_connections
    if model.max_connections != limit and model.limit_connections(limit):
        logger.info(
            "model server: at most %d connections open to it (%d declared at %s, plus %d)",
            limit,
            declared,
            probe.path,
            probe.spare_connections,
        )


def still_declared(measured: int | None, declared: int | None) -> bool:
    """Whether the engine declares now (`declared`) what it did when a cached figure was
    measured: an engine started with more slots (llama-server's --parallel, SGLang's
    --max-running-requests) serves more."""
    if measured == declared:
        return True
    logger.info(
        "benchmark cache: measured when the engine declared %s at once, now %s: measured again",
        measured,
        declared,
    )
    return False
