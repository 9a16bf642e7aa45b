from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from pyworker.devtools.demo.model_server import (
    LISTENING_PATTERN,
    LOADED_LINE,
    DemoSettings,
    create_app,
)

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
def start(aiohttp_client: ClientFactory) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    async def start_server(wait_loaded: bool = True, **settings: Any) -> TestClient[Any, Any]:
        settings.setdefault("load_seconds", 0.0)
        settings.setdefault("tokens_per_second", 0.0)
        client = await aiohttp_client(create_app(DemoSettings(**settings)))
        if wait_loaded:

            async def loaded() -> bool:
                async with client.get("/health") as answer:
                    return answer.status == 200

            await wait_for(loaded)
        return client

    return start_server


async def sse_events(answer: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, str]]:
    """Each SSE `data:` payload with the time it arrived."""
    async for raw in answer.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield time.monotonic(), line.removeprefix("data: ")


async def test_completion_has_openai_shape_and_exact_usage(start: Any) -> None:
    client = await start()
    async with client.post("/v1/completions", json={"prompt": "hello there", "max_tokens": 7}) as a:
        assert a.status == 200
        body = await a.json()
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length"
    assert len(choice["text"].split()) == 7
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}


async def test_text_is_deterministic_per_prompt(start: Any) -> None:
    client = await start()

    async def text(prompt: str) -> str:
        async with client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12}) as a:
            return str((await a.json())["choices"][0]["text"])

    assert await text("one prompt") == await text("one prompt")
    assert await text("one prompt") != await text("another prompt")


async def test_max_tokens_defaults_to_16_and_is_capped(start: Any) -> None:
    client = await start(max_tokens_limit=20)
    async with client.post("/v1/completions", json={"prompt": "x"}) as answer:
        assert (await answer.json())["usage"]["completion_tokens"] == 16
    async with client.post("/v1/completions", json={"prompt": "x", "max_tokens": 500}) as answer:
        assert (await answer.json())["usage"]["completion_tokens"] == 20


async def test_chat_completion_answers_as_assistant(start: Any) -> None:
    client = await start()
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with client.post("/v1/chat/completions", json=request) as answer:
        body = await answer.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert len(message["content"].split()) == 4
    assert body["usage"]["completion_tokens"] == 4


async def test_non_streaming_answer_takes_max_tokens_over_rate(start: Any) -> None:
    client = await start(tokens_per_second=100.0)
    started = time.monotonic()
    async with client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10}) as answer:
        assert answer.status == 200
    assert time.monotonic() - started >= 0.09


async def test_stream_sends_tokens_one_by_one_then_done(start: Any) -> None:
    client = await start(tokens_per_second=40.0)
    request = {
        "prompt": "stream me",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.post("/v1/completions", json=request) as answer:
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        events = [event async for event in sse_events(answer)]
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    token_times = [at for (at, _), chunk in zip(events, chunks, strict=False) if chunk["choices"]]
    token_chunks = [chunk for chunk in chunks if chunk["choices"]]
    texts = [chunk["choices"][0]["text"] for chunk in token_chunks[:-1]]
    assert len(texts) == 5 and all(texts)
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert token_times[4] - token_times[0] >= 0.05  # 4 gaps of 25 ms: paced, not one burst
    assert chunks[-1]["choices"] == []
    assert all(chunk["usage"] is None for chunk in chunks[:-1])  # OpenAI's shape
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    async with client.post("/v1/completions", json={"prompt": "stream me", "max_tokens": 5}) as a:
        assert (await a.json())["choices"][0]["text"] == "".join(texts)


async def test_chat_stream_starts_with_the_assistant_role(start: Any) -> None:
    client = await start()
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with client.post("/v1/chat/completions", json=request) as answer:
        events = [data async for _, data in sse_events(answer)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in chunks[1:-1]]
    assert len(contents) == 3 and all(contents)
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
        "delta": {},
    }
    assert all("usage" not in chunk for chunk in chunks)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b"[1, 2]"),
        ("/v1/completions", b'{"max_tokens": 3}'),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "3"}'),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}'),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}'),
        ("/v1/completions", b'{"prompt": "x", "stream": true, "stream_options": 1}'),
        ("/v1/completions", b'{"prompt": "x", "n": 2}'),
        ("/v1/chat/completions", b'{"messages": []}'),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
    ],
)
async def test_malformed_requests_get_openai_errors(start: Any, path: str, body: bytes) -> None:
    client = await start()
    async with client.post(path, data=body) as answer:
        assert answer.status == 400
        error = (await answer.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


async def test_requests_get_503_until_loaded(start: Any) -> None:
    started = time.monotonic()
    client = await start(wait_loaded=False, load_seconds=0.3)
    async with client.get("/health") as answer:
        assert answer.status == 503
        assert await answer.json() == {"status": "loading"}
    async with client.post("/v1/completions", json={"prompt": "x"}) as answer:
        assert answer.status == 503
        assert "error" in await answer.json()
    async with client.get("/v1/models") as answer:
        assert answer.status == 503

    async def healthy() -> bool:
        async with client.get("/health") as answer:
            return bool(answer.status == 200)

    await wait_for(healthy)
    assert time.monotonic() - started >= 0.3
    async with client.get("/health") as answer:
        assert await answer.json() == {"status": "ok"}
    async with client.get("/v1/models") as answer:
        assert (await answer.json())["data"][0]["id"] == "demo"
    async with client.post("/v1/completions", json={"prompt": "x"}) as answer:
        assert answer.status == 200


async def test_log_has_loaded_line_after_load_and_no_prompts(start: Any, tmp_path: Path) -> None:
    log_file = tmp_path / "model.log"
    client = await start(wait_loaded=False, load_seconds=0.3, log_file=log_file)

    async def has_startup_noise() -> bool:
        return log_file.exists() and "Starting" in log_file.read_text()

    await wait_for(has_startup_noise)
    assert LOADED_LINE not in log_file.read_text()
    async with client.get("/health") as answer:
        assert answer.status == 503

    async def loaded() -> bool:
        return LOADED_LINE in log_file.read_text()

    await wait_for(loaded)
    async with client.get("/health") as answer:
        assert answer.status == 200  # the line is written only once requests are served
    secret = "a-very-private-prompt"
    async with client.post("/v1/completions", json={"prompt": secret}) as answer:
        assert answer.status == 200

    async def logged_access() -> bool:
        return '"POST /v1/completions HTTP/1.1" 200' in log_file.read_text()

    await wait_for(logged_access)
    text = log_file.read_text()
    assert secret not in text
    assert len([line for line in text.splitlines() if LOADED_LINE in line]) == 1


async def test_concurrency_limit_queues_requests(start: Any) -> None:
    client = await start(tokens_per_second=20.0, max_concurrent_requests=1)
    request = {"prompt": "x", "max_tokens": 2}  # 0.1 s each

    async def complete() -> int:
        async with client.post("/v1/completions", json=request) as answer:
            return int(answer.status)

    started = time.monotonic()
    assert list(await asyncio.gather(complete(), complete())) == [200, 200]
    assert time.monotonic() - started >= 0.19


async def test_runs_as_a_process_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pyworker.devtools.demo.model_server",
        "--port",
        "0",
        "--load-seconds",
        "0.2",
        "--tokens-per-second",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        url = await asyncio.wait_for(_listening_url(process.stdout), timeout=20)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def healthy() -> bool:
                async with session.get(url + "/health") as answer:
                    return answer.status == 200

            await wait_for(healthy)
            request = {"prompt": "hello", "max_tokens": 3}
            async with session.post(url + "/v1/completions", json=request) as answer:
                assert (await answer.json())["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        rest = (await process.stdout.read()).decode()
        assert LOADED_LINE in rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _listening_url(stdout: asyncio.StreamReader) -> str:
    while line := await stdout.readline():
        match = LISTENING_PATTERN.search(line.decode())
        if match:
            return match.group(1)
    raise AssertionError("the server exited before listening")


async def test_a_client_leaving_mid_stream_frees_its_slot(start: Any) -> None:
    client = await start(tokens_per_second=100.0, max_concurrent_requests=1)
    request = {"prompt": "x", "max_tokens": 2000, "stream": True}  # 20 s if it ran to the end
    answer = await client.post("/v1/completions", json=request)
    await answer.content.readline()
    answer.close()

    async def second() -> int:
        async with client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}) as a:
            return int(a.status)

    assert await asyncio.wait_for(second(), timeout=5) == 200
