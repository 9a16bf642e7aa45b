"""What the ready workers' client scripts share: the call to the worker and the exit status.

Each script (openai/client.py, tgi/client.py, comfyui/client.py) asks the autoscaler for a
worker (pyworker.devtools.commands.routing), then sends `{"auth_data", "payload"}` to the path
it serves; only the payload and the way the answer is printed differ.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import aiohttp


@asynccontextmanager
async def worker_answer(
    session: aiohttp.ClientSession,
    auth_data: dict[str, Any],
    path: str,
    payload: dict[str, Any],
    timeout: aiohttp.ClientTimeout,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """The worker's answer to `payload` on `path`; RuntimeError, with its body, unless 200."""
    envelope = {"auth_data": auth_data, "payload": payload}
    url = str(auth_data["url"]).rstrip("/") + path
    async with session.post(url, json=envelope, timeout=timeout) as response:
        if response.status != 200:
            raise RuntimeError(f"worker answered {response.status}: {await response.text()}")
        yield response


def run_client(
    script: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    arguments: argparse.Namespace,
) -> int:
    """Run the script's coroutine: exit status 0, or 1 with `error: ...` when the call failed."""
    try:
        asyncio.run(script(arguments))
    except (aiohttp.ClientError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
