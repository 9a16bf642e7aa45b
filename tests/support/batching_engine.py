"""A fake batching engine on loopback whose capacity is known from its model.

It decodes like vLLM or llama-server: up to `slots` sequences at once, one token each per
step, more waiting in a queue. A step with `b` sequences takes `step * (1 + 4 * b / slots)`
seconds (a fixed cost, and a cost per sequence), so throughput grows with what is in flight
up to `slots` (by 20 % or more at each doubling) and is flat beyond: the capacity is
`slots / (5 * step)` tokens/s. Steps are scheduled
on absolute times, so a late wake-up of a loaded machine shortens the next step instead of
losing tokens. `POST /v1/completions {"max_tokens": n}` answers after n tokens, with `usage`
(unless the payload says `"usage": false`);
`GET /props` says `total_slots` as llama-server does; `GET /stats` what it saw.

Run it in its own process (`python -m tests.support.batching_engine --slots 64 --step 0.005`,
which prints `listening on URL`) so that its clock does not share the benchmark's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Sequence:
    remaining: int
    done: asyncio.Future[None]


@dataclass
class BatchingEngine:
    slots: int
    step: float
    waiting: deque[Sequence] = field(default_factory=deque)
    peak_in_flight: int = 0
    in_flight: int = 0
    requests: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def capacity(self) -> float:
        """Tokens per second with every slot busy."""
        return self.throughput(self.slots)

    def throughput(self, in_flight: int) -> float:
        """Tokens per second with `in_flight` requests always there."""
        batch = min(in_flight, self.slots)
        return batch / self.step_seconds(batch)

    def closed_loop(self, in_flight: int, mean_tokens: float) -> float:
        """Tokens per second of a closed loop of `in_flight` up to `slots`: a request sent as
        another ends joins at the next step, so a slot is idle one step a request and carries
        `mean / (mean + 1)` sequences on average."""
        assert in_flight <= self.slots
        busy = in_flight * mean_tokens / (mean_tokens + 1)
        return busy / (self.step * (1 + 4 * busy / self.slots))

    def step_seconds(self, batch: int) -> float:
        return self.step * (1 + 4 * batch / self.slots)

    async def run(self) -> None:
        active: list[Sequence] = []
        next_at = time.monotonic()
        while True:
            while self.waiting and len(active) < self.slots:
                active.append(self.waiting.popleft())
            if not active:
                self._arrived.clear()
                await self._arrived.wait()
                next_at = time.monotonic()
                continue
            next_at += self.step_seconds(len(active))
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            for sequence in active:
                sequence.remaining -= 1
                if sequence.remaining <= 0 and not sequence.done.done():
                    sequence.done.set_result(None)
            active = [sequence for sequence in active if sequence.remaining > 0]

    async def completions(self, request: web.Request) -> web.Response:
        payload = await request.json()
        tokens = int(payload.get("max_tokens", 1))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.waiting.append(Sequence(tokens, done))
        self._arrived.set()
        try:
            await done
        finally:
            self.in_flight -= 1
        answer: dict[str, object] = {"choices": [{"text": "x" * tokens}]}
        if payload.get("usage", True):  # `"usage": false` asks for an answer without it
            answer["usage"] = {
                "prompt_tokens": 0,
                "completion_tokens": tokens,
                "total_tokens": tokens,
            }
        return web.json_response(answer)

    async def props(self, request: web.Request) -> web.Response:
        return web.json_response({"total_slots": self.slots})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"peak_in_flight": self.peak_in_flight, "requests": self.requests})


def create_app(engine: BatchingEngine) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/completions", engine.completions)
    app.router.add_get("/props", engine.props)
    app.router.add_get("/stats", engine.stats)

    async def decode(app: web.Application) -> object:
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app.cleanup_ctx.append(decode)  # type: ignore[arg-type]
    return app


async def serve(slots: int, step: float) -> None:
    runner = web.AppRunner(create_app(BatchingEngine(slots, step)), access_log=None)
    await runner.setup()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, listener)
    await site.start()
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--step", type=float, required=True)
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.slots, arguments.step))
