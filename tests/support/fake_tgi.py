"""A fake text-generation-inference (TGI) server: TGI's native API, and TGI's real log lines.

    python -m tests.support.fake_tgi --log FILE [--load-after S] [--tokens-per-second N]
                                     [--fail-start]

It prints `listening on http://127.0.0.1:PORT` once its port is open. Its log gets the
launcher's start-up lines at once and, `--load-after` seconds later, the shard-ready and
router lines ending with "Connected"; until then `/health` and generation answer 503. With
`--fail-start` the shard dies of CUDA OOM instead and the launcher exits with
`Error: ShardCannotStart` (the lines of a real failed start). Every line is a real TGI line
with a fresh timestamp; pyworker/workers/tgi/README.md cites where each comes from.

API: `POST /generate` (`{"generated_text", "details"?}`), `POST /generate_stream` (SSE, one
`data:` event a token, the last with `generated_text` and `details`), `GET /health`,
`GET /info`. Tokens come at `--tokens-per-second` per request, batched as TGI would.

Control: `POST /control/crash` replays a shard dying of CUDA OOM mid-generation (then
`/health` and generation fail); `POST /control/log {"line"}` appends a line;
`GET /control/stats` counts generations.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

MODEL_ID = "bigscience/bloom-560m"
DEFAULT_MAX_NEW_TOKENS = 100
WORDS = ("Deep", " learning", " is", " a", " subset", " of", " machine", " learning", ".")

# Start-up, as launched by `text-generation-launcher --model-id bigscience/bloom-560m`.
STARTUP = (
    '{ts}  INFO text_generation_launcher: Args { model_id: "bigscience/bloom-560m", '
    "revision: None, validation_workers: 2, sharded: None, num_shard: None, quantize: None, "
    "dtype: None, trust_remote_code: false, max_concurrent_requests: 128, max_best_of: 2, "
    "max_stop_sequences: 4, max_top_n_tokens: 5, max_input_length: 1024, "
    "max_total_tokens: 2048, waiting_served_ratio: 1.2, max_batch_prefill_tokens: 4096, "
    'max_batch_total_tokens: None, max_waiting_tokens: 20, hostname: "0.0.0.0", port: 5001, '
    'shard_uds_path: "/tmp/text-generation-server", master_addr: "localhost", '
    'master_port: 29500, huggingface_hub_cache: Some("/data"), weights_cache_override: None, '
    "disable_custom_kernels: false, cuda_memory_fraction: 1.0, rope_scaling: None, "
    "rope_factor: None, json_output: false, otlp_endpoint: None, cors_allow_origin: [], "
    "watermark_gamma: None, watermark_delta: None, ngrok: false, ngrok_authtoken: None, "
    "ngrok_edge: None, env: false }",
    "{ts}  INFO download: text_generation_launcher: Starting download process.",
    "{ts}  INFO text_generation_launcher: Files are already present on the host. "
    "Skipping download.",
    "",
    "{ts}  INFO download: text_generation_launcher: Successfully downloaded weights.",
    "{ts}  INFO shard-manager: text_generation_launcher: Starting shard rank=0",
    "{ts}  INFO shard-manager: text_generation_launcher: Waiting for shard to be ready... rank=0",
)
# The shard is up, the launcher starts the router, the router warms up and connects.
LOADED = (
    "{ts}  INFO shard-manager: text_generation_launcher: Shard ready in 12.391534321s rank=0",
    "{ts}  INFO text_generation_launcher: Starting Webserver",
    "{ts}  INFO text_generation_router: router/src/main.rs:213: Warming up model",
    "{ts}  INFO text_generation_router: router/src/main.rs:246: "
    "Setting max batch total tokens to 16000",
    "{ts}  INFO text_generation_router: router/src/main.rs:247: Connected",
    "{ts}  WARN text_generation_router: router/src/main.rs:252: "
    "Invalid hostname, defaulting to 0.0.0.0",
)
OOM = (
    "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 128.00 MiB "
    "(GPU 0; 15.77 GiB total capacity; 15.37 GiB already allocated; 13.62 MiB free; "
    "15.77 GiB allowed; 15.40 GiB reserved in total by PyTorch) If reserved memory is >> "
    "allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation "
    "for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
)
# A shard that runs out of memory while loading: the launcher gives up.
FAILED_START = (
    "{ts} ERROR shard-manager: text_generation_launcher: Shard complete standard error output:",
    "",
    OOM,
    " rank=0",
    "Error: ShardCannotStart",
    "{ts} ERROR text_generation_launcher: Shard 0 failed to start",
    "{ts}  INFO text_generation_launcher: Shutting down shards",
)
# A shard that runs out of memory during a prefill: a RuntimeError, so the shard exits.
CRASH = (
    "{ts} ERROR text_generation_launcher: Method Prefill encountered an error.",
    OOM,
    "{ts} ERROR text_generation_launcher: Shard 0 crashed",
    "{ts}  INFO text_generation_launcher: Shutting down shards",
    "Error: ShardFailed",
)


def timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeTgi:
    def __init__(self, log_path: str, load_after: float, tokens_per_second: float) -> None:
        self.log_path = log_path
        self.load_after = load_after
        self.token_seconds = 1.0 / tokens_per_second
        self.loaded = False
        self.crashed = False
        self.generations = 0

    def log(self, *lines: str) -> None:
        now = timestamp()
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.writelines(line.replace("{ts}", now) + "\n" for line in lines)

    async def start(self, fail: bool) -> None:
        self.log(*STARTUP)
        await asyncio.sleep(self.load_after)
        if fail:
            self.log(*FAILED_START)
            return
        self.log(*LOADED)
        self.loaded = True

    # --- the API -------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_get("/health", self.health)
        app.router.add_get("/info", self.info)
        app.router.add_post("/control/crash", self.crash)
        app.router.add_post("/control/log", self.control_log)
        app.router.add_get("/control/stats", self.stats)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.loaded and not self.crashed:
            return web.Response(status=200)
        return _error(503, "unhealthy", "healthcheck")

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"model_id": MODEL_ID, "model_dtype": "torch.float16", "max_total_tokens": 2048}
        )

    async def generate(self, request: web.Request) -> web.Response:
        checked = await self._check(request, streaming=False)
        if isinstance(checked, web.Response):
            return checked
        inputs, parameters, count = checked
        await asyncio.sleep(count * self.token_seconds)
        tokens = _tokens(count)
        answer: dict[str, Any] = {"generated_text": "".join(t["text"] for t in tokens)}
        if parameters.get("details"):
            prefill = (
                [{"id": 1000 + i, "text": word, "logprob": None if i == 0 else -2.5}
                 for i, word in enumerate(inputs.split())]
                if parameters.get("decoder_input_details")
                else []
            )  # fmt: skip
            answer["details"] = {
                "finish_reason": "length",
                "generated_tokens": count,
                "seed": parameters.get("seed"),
                "prefill": prefill,
                "tokens": tokens,
                "top_tokens": [],
            }
        return web.json_response(answer)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        checked = await self._check(request, streaming=True)
        if isinstance(checked, web.Response):
            return checked
        _, parameters, count = checked
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        text = ""
        for index, token in enumerate(_tokens(count), start=1):
            await asyncio.sleep(self.token_seconds)
            text += token["text"]
            last = index == count
            details = {"finish_reason": "length", "generated_tokens": count, "seed": None}
            event = {
                "index": index,
                "token": token,
                "top_tokens": None,
                "generated_text": text if last else None,
                "details": details if last and parameters.get("details") else None,
            }
            await response.write(b"data:" + json.dumps(event).encode() + b"\n\n")
        await response.write_eof()
        return response

    async def _check(
        self, request: web.Request, streaming: bool
    ) -> web.Response | tuple[str, dict[str, Any], int]:
        """TGI's own validation, with its messages; the token count to generate."""
        if not self.loaded or self.crashed:
            return _error(503, "Model is not loaded", "unhealthy")
        payload = await request.json()
        inputs = payload.get("inputs")
        parameters = payload.get("parameters") or {}
        if not isinstance(inputs, str) or not inputs:
            return _error(422, "Input validation error: `inputs` cannot be empty", "validation")
        count = parameters.get("max_new_tokens")
        count = DEFAULT_MAX_NEW_TOKENS if count is None else count
        if not isinstance(count, int) or count <= 0:
            message = "Input validation error: `max_new_tokens` must be strictly positive"
            return _error(422, message, "validation")
        if streaming and parameters.get("decoder_input_details"):
            message = (
                "Input validation error: `decoder_input_details` == true is not supported "
                "when streaming tokens"
            )
            return _error(422, message, "validation")
        self.generations += 1
        return inputs, parameters, count

    # --- control -------------------------------------------------------------------------
    async def crash(self, request: web.Request) -> web.Response:
        self.crashed = True
        self.log(*CRASH)
        return web.json_response({"ok": True})

    async def control_log(self, request: web.Request) -> web.Response:
        self.log((await request.json())["line"])
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"generations": self.generations})


def _tokens(count: int) -> list[dict[str, Any]]:
    words = itertools.islice(itertools.cycle(WORDS), count)
    return [
        {"id": 2000 + i, "text": word, "logprob": -0.4, "special": False}
        for i, word in enumerate(words)
    ]


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": message, "error_type": kind}, status=status)


async def main(arguments: argparse.Namespace) -> None:
    server = FakeTgi(arguments.log, arguments.load_after, arguments.tokens_per_second)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    starting = asyncio.create_task(server.start(arguments.fail_start))
    await stop.wait()
    starting.cancel()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--load-after", type=float, default=1.0)
    parser.add_argument("--tokens-per-second", type=float, default=2000.0)
    parser.add_argument("--fail-start", action="store_true")
    asyncio.run(main(parser.parse_args()))
