"""The real client, vastai's `Serverless`, served end to end by a pyworker through the local
autoscaler: it routes with `/route/`, polls while no worker is ready, and calls the worker with
the signed auth_data, which the worker verifies against the autoscaler's public key.

The client downloads Vast.ai's root certificate before its first request; the subclass below
builds a default TLS context instead, so the test stays offline (everything here is plain HTTP
on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

pytest.importorskip(
    "vastai", reason="Vast's SDK (the `sdk` extra) is not installed: scripts/test's lowest run"
)
from vastai.serverless.client import Endpoint, Serverless

from pyworker.config.environment import Environment
from pyworker.config.loader import load_config
from pyworker.devtools.demo.model_server import DemoSettings
from pyworker.devtools.demo.model_server import create_app as create_demo_app
from pyworker.devtools.local.autoscaler import LocalAutoscaler
from pyworker.devtools.local.fleet import WorkerPhase
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import serve
from tests.conftest import wait_until

API_KEY = "local-test-key"
WORKER_ID = 7


class OfflineServerless(Serverless):  # type: ignore[misc]  # vastai is untyped
    """`Serverless` without its download of https://console.vast.ai/static/jvastai_root.cer."""

    _ssl_context: ssl.SSLContext | None

    async def get_ssl_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


@dataclass
class Stack:
    autoscaler: LocalAutoscaler
    worker: Worker

    def phase(self) -> WorkerPhase | None:
        record = self.autoscaler.fleet.workers.get(WORKER_ID)
        return None if record is None else self.autoscaler.fleet.phase(record)


@contextlib.asynccontextmanager
async def demo_server(log_file: Path) -> AsyncIterator[str]:
    settings = DemoSettings(load_seconds=0.0, tokens_per_second=0.0, log_file=log_file)
    runner = web.AppRunner(create_demo_app(settings), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(address[1] for address in runner.addresses if isinstance(address, tuple))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """Autoscaler, demo model server and the hello_world worker, wired as `pyworker dev` does."""
    log_file = tmp_path / "model.log"
    async with LocalAutoscaler("hello_world") as autoscaler, demo_server(log_file) as model_url:
        config = load_config(
            "hello_world", environ={"MODEL_SERVER_URL": model_url, "MODEL_LOG": str(log_file)}
        )
        environment = Environment.from_env(
            {
                "REPORT_ADDR": autoscaler.url,
                "CONTAINER_ID": str(WORKER_ID),
                "UNSECURED": "false",
                "WORKER_HOST": "127.0.0.1",
                "PUBLIC_IPADDR": "127.0.0.1",
                "WORKER_PORT": "0",
                "WORKER_HTTP_PORT": "0",
            }
        )
        worker = compose_worker(config, environment)
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(worker, "127.0.0.1", 0, stop))
        try:
            yield Stack(autoscaler, worker)
        finally:
            stop.set()
            await asyncio.wait_for(serving, 15)


async def test_serverless_client_is_served_through_the_local_autoscaler(stack: Stack) -> None:
    async with OfflineServerless(api_key=API_KEY, autoscaler_url=stack.autoscaler.url) as client:
        endpoint = Endpoint(client, name="hello_world", id=1, api_key=API_KEY)
        # Sent while the worker is still loading: the client polls /route/ until it is ready.
        pending = endpoint.request("/v1/completions", {"prompt": "hello", "max_tokens": 5}, cost=5)
        result: dict[str, Any] = await asyncio.wait_for(pending, 60)

    assert result["ok"] is True and result["status"] == 200
    assert result["url"] == stack.worker.url
    answer = result["response"]
    assert answer["object"] == "text_completion"
    assert answer["usage"]["completion_tokens"] == 5
    assert len(answer["choices"][0]["text"].split()) == 5
    assert result["auth_data"]["signature"]  # the worker verified it (UNSECURED=false)
    assert stack.phase() is WorkerPhase.READY

    # The worker reports the request finished, under the index the autoscaler gave it.
    request_idx = result["request_idx"]
    assert request_idx > 0

    def reported() -> bool:
        return any(item.request_idx == request_idx for item in stack.autoscaler.finished)

    await wait_until(reported, timeout=15)
    (finished,) = [item for item in stack.autoscaler.finished if item.request_idx == request_idx]
    assert finished.worker_id == WORKER_ID
    assert finished.success is True and finished.status == "Success"


async def test_serverless_client_streams_through_the_worker(stack: Stack) -> None:
    await wait_until(lambda: stack.phase() is WorkerPhase.READY, timeout=30)
    payload = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with OfflineServerless(api_key=API_KEY, autoscaler_url=stack.autoscaler.url) as client:
        endpoint = Endpoint(client, name="hello_world", id=1, api_key=API_KEY)
        result = await asyncio.wait_for(
            endpoint.request("/v1/chat/completions", payload, cost=4, stream=True), 30
        )
        assert result["ok"] is True and result["status"] == 200
        chunks = [chunk async for chunk in result["response"]]

    deltas = [
        chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]
    ]
    assert len("".join(deltas).split()) == 4
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_a_request_for_another_endpoint_is_refused_by_the_autoscaler(stack: Stack) -> None:
    async with OfflineServerless(api_key=API_KEY, autoscaler_url=stack.autoscaler.url) as client:
        endpoint = Endpoint(client, name="not-hello", id=2, api_key=API_KEY)
        with pytest.raises(RuntimeError, match="HTTP 404"):
            await asyncio.wait_for(endpoint.request("/v1/completions", {}, retry=False), 30)
