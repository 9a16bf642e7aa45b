"""A model server process that logs like vLLM: start-up noise, then its load line later.

    python -m tests.support.logging_model_server --log FILE [--load-after SECONDS]

It prints `listening on http://127.0.0.1:PORT` once its port is open (before the model is
"loaded"), answers `/health` 503 until loaded, and serves an OpenAI-like `/v1/completions`
with `usage`. `POST /control/log {"line": ...}` appends a line to its log, to script errors
and recoveries; `POST /control/load` loads the model now (its health turns 200, its load line
is logged), for a test that sets `--load-after` far out; `GET /control/stats` says how many
completions it served.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from aiohttp import web

# Real vLLM start-up lines (v0.6.x), as the openai worker's README cites them.
STARTUP_NOISE = (
    "INFO 11-23 10:00:01 api_server.py:528] vLLM API server version 0.6.3.post1",
    "INFO 11-23 10:00:01 api_server.py:529] args: Namespace(host=None, port=8000, ...)",
    "INFO 11-23 10:00:09 model_runner.py:1067] Loading model weights took 14.9888 GB",
    "INFO 11-23 10:00:14 gpu_executor.py:122] # GPU blocks: 27153, # CPU blocks: 2048",
)
LOADED_LINE = "INFO:     Application startup complete."


class LoggingModelServer:
    def __init__(self, log_path: str, load_after: float) -> None:
        self.log_path = log_path
        self.load_after = load_after
        self.loaded = False
        self.completions = 0

    def log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    async def load(self) -> None:
        for line in STARTUP_NOISE:
            self.log(line)
        await asyncio.sleep(self.load_after)
        self.finish_loading()

    def finish_loading(self) -> None:
        if not self.loaded:
            self.loaded = True
            self.log(LOADED_LINE)

    def app(self) -> web.Application:
        async def completions(request: web.Request) -> web.Response:
            payload = await request.json()
            tokens = int(payload.get("max_tokens", 4))
            self.completions += 1
            usage = {"prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": tokens + 2}
            return web.json_response({"choices": [{"text": "x" * tokens}], "usage": usage})

        async def health(request: web.Request) -> web.Response:
            return web.Response(status=200 if self.loaded else 503)

        async def control_log(request: web.Request) -> web.Response:
            self.log((await request.json())["line"])
            return web.json_response({"ok": True})

        async def control_load(request: web.Request) -> web.Response:
            self.finish_loading()
            return web.json_response({"ok": True})

        async def stats(request: web.Request) -> web.Response:
            return web.json_response({"completions": self.completions})

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", health)
        app.router.add_post("/control/log", control_log)
        app.router.add_post("/control/load", control_load)
        app.router.add_get("/control/stats", stats)
        return app


async def main(log_path: str, load_after: float) -> None:
    server = LoggingModelServer(log_path, load_after)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    loading = asyncio.create_task(server.load())
    await stop.wait()
    loading.cancel()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--load-after", type=float, default=1.0)
    arguments = parser.parse_args()
    started = time.monotonic()
    asyncio.run(main(arguments.log, arguments.load_after))
