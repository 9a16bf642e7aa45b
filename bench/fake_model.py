"""A minimal, fast fake model server: the benchmark measures the proxy, not the model.

Routes: `POST /generate` answers a small JSON document at once; `POST /slow` sleeps `seconds`
(from the payload) before answering; `POST /stream` sends `chunks` SSE events `delay` seconds
apart; `GET /health` answers 200. Run it as its own process:
`python -m bench.fake_model --port 0`; it prints `listening on http://HOST:PORT` when bound.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
from aiohttp import web

from bench.serving import serve_forever

ANSWER = orjson.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "choices": [{"index": 0, "text": " a short generated answer", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }
)
MAX_SLEEP = 60.0
MAX_CHUNKS = 10_000


async def _payload(request: web.Request) -> dict[str, Any]:
    document = orjson.loads(await request.read())
    return document if isinstance(document, dict) else {}


async def generate(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


async def slow(request: web.Request) -> web.Response:
    payload = await _payload(request)
    await asyncio.sleep(min(float(payload.get("seconds", 1.0)), MAX_SLEEP))
    return web.Response(body=ANSWER, content_type="application/json")


async def stream(request: web.Request) -> web.StreamResponse:
    payload = await _payload(request)
    chunks = min(int(payload.get("chunks", 5)), MAX_CHUNKS)
    delay = min(float(payload.get("delay", 0.005)), MAX_SLEEP)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index in range(chunks):
        if index:
            await asyncio.sleep(delay)
        await response.write(b'data: {"index": %d, "text": " token"}\n\n' % index)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"ok": true}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_post("/slow", slow)
    app.router.add_post("/stream", stream)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    serve_forever(create_app(), arguments.host, arguments.port, fast_loop=True)


if __name__ == "__main__":
    main()
