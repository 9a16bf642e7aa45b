"""A fake batching engine on loopback whose capacity is known from its model.

It decodes like vLLM or llama-server: up to `slots` sequences at once, one token each per
step, more waiting in a queue. A step with `b` sequences takes `step * (1 + b / slots)`
seconds, so throughput `b / (step * (1 + b / slots))` tokens/s grows with what is in flight
up to `slots` and is flat beyond: the capacity is `slots / (2 * step)`. Steps are scheduled
on absolute times, so a late wake-up of a loaded machine shortens the next step instead of
losing tokens. `POST /v1/completions {"max_tokens": n}` answers after n tokens, with `usage`.
"""

from __future__ import annotations

import asyncio
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
        return self.slots / (2 * self.step)

    def throughput(self, in_flight: int) -> float:
        batch = min(in_flight, self.slots)
        return batch / (self.step * (1 + batch / self.slots))

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
            next_at += self.step * (1 + len(active) / self.slots)
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
        usage = {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"choices": [{"text": "x" * tokens}], "usage": usage})

    async def props(self, request: web.Request) -> web.Response:
        return web.json_response({"total_slots": self.slots})


def create_app(engine: BatchingEngine) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/completions", engine.completions)
    app.router.add_get("/props", engine.props)

    async def decode(app: web.Application) -> object:
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app.cleanup_ctx.append(decode)  # type: ignore[arg-type]
    return app
