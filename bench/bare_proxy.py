"""The floor of the stack: the least an aiohttp proxy in pyworker's place can do.

Parse the body, forward `payload` as JSON on one pooled session, relay the answer (streams
chunk by chunk). No signature check, no accounting, no admission, default asyncio loop and
stdlib json: whatever pyworker costs above this is the price of its features.
Run it as its own process: `python -m bench.bare_proxy --model http://127.0.0.1:PORT`.
"""

from __future__ import annotations

import argparse
import json

import aiohttp
from aiohttp import web

from bench.serving import serve_forever

SESSION = web.AppKey("session", aiohttp.ClientSession)
MODEL_URL = web.AppKey("model_url", str)
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=600.0)
JSON_HEADERS = {"Content-Type": "application/json"}


async def forward(request: web.Request) -> web.StreamResponse:
    try:
        document = json.loads(await request.read())
        payload = document["payload"]
    except (ValueError, KeyError, TypeError):
        return web.Response(status=422, text="invalid request")
    session = request.app[SESSION]
    url = request.app[MODEL_URL] + request.path
    async with session.post(url, data=json.dumps(payload), headers=JSON_HEADERS) as upstream:
        if upstream.content_type != "text/event-stream":
            body = await upstream.read()
            return web.Response(
                status=upstream.status, body=body, content_type=upstream.content_type
            )
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def create_app(model_url: str) -> web.Application:
    app = web.Application()
    app[MODEL_URL] = model_url.rstrip("/")

    async def open_session(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        app[SESSION] = aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)

    async def close_session(app: web.Application) -> None:
        await app[SESSION].close()

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_post("/{path:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the model server's base URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    serve_forever(create_app(arguments.model), arguments.host, arguments.port, fast_loop=False)


if __name__ == "__main__":
    main()
