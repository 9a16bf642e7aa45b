"""A route's `body_encoder`: what the model server receives, and what the client gets when the
encoder refuses or fails (the model server then receives nothing)."""

from __future__ import annotations

from typing import Any

from pyworker.config.encoded_body import EncodedBody, PayloadRefused
from tests.conftest import KeyPair, ModelServer, WorkerFactory


def envelope(keypair: KeyPair, payload: dict[str, Any]) -> dict[str, Any]:
    return {"auth_data": keypair.auth_data(), "payload": payload}


async def encode(payload: dict[str, Any]) -> EncodedBody:
    if payload.get("refuse"):
        raise PayloadRefused(413, "upload too large", {"file": "over 10 bytes"})
    if payload.get("crash"):
        raise RuntimeError("bug")
    text = payload["text"].encode()
    return EncodedBody("application/json; charset=utf-8", [b'{"text": "', text, b'"}'])


async def test_the_model_server_receives_the_encoded_body_under_its_content_type(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(routes=[{"path": "/echo", "body_encoder": encode}])
    async with worker.post("/echo", envelope(keypair, {"text": "héllo", "x": 1})) as response:
        assert response.status == 200
        assert await response.json() == {"received": {"text": "héllo"}}
    assert model_server.recorder.payloads == [{"text": "héllo"}]
    assert model_server.recorder.headers[0]["Content-Type"] == "application/json; charset=utf-8"


async def test_a_refusal_reaches_the_client_and_nothing_the_model_server(
    start_worker: WorkerFactory, keypair: KeyPair, model_server: ModelServer
) -> None:
    worker = await start_worker(routes=[{"path": "/echo", "body_encoder": encode}])
    async with worker.post("/echo", envelope(keypair, {"refuse": True})) as response:
        assert response.status == 413
        assert await response.json() == {"error": "upload too large", "file": "over 10 bytes"}
    async with worker.post("/echo", envelope(keypair, {"crash": True})) as response:
        assert response.status == 500
        assert await response.json() == {"error": "the worker's body encoder failed"}
    assert model_server.recorder.payloads == []
    assert worker.worker.ledger.take_finished() == []  # refused before admission: not accounted
