"""Serving a benchmark process's aiohttp app until SIGTERM, telling the parent its port."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

# A thousand clients connecting at once must not overflow the accept queue (aiohttp's
# default backlog is 128, and a dropped SYN costs a one-second retransmit).
BACKLOG = 4096


def serve_forever(app: web.Application, host: str, port: int, fast_loop: bool) -> None:
    """Serve `app`, print `listening on http://HOST:PORT` once bound, and stop on a signal."""
    if fast_loop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(app, host, port))


async def _serve(app: web.Application, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True)
        await site.start()
        bound = port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                bound = int(address[1])
        print(f"listening on http://{host}:{bound}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
