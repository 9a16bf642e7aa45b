"""A client of a `tgi` worker: ask the autoscaler for a worker, then stream TGI's answer.

    python -m pyworker.devtools.local.autoscaler --port 8081 &          # or the real autoscaler
    python workers/tgi/client.py --autoscaler http://127.0.0.1:8081 "What is Deep Learning?"
    python workers/tgi/client.py --worker http://127.0.0.1:3000 --no-stream "Hi"  # UNSECURED

Two steps make the whole protocol: `POST {autoscaler}/route/` answers signed `auth_data`
naming a worker (or a waiting status, to ask again), and the worker takes
`{"auth_data": ..., "payload": <TGI's request>}` on `/generate` or `/generate_stream`.
It needs only aiohttp.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import Any

import aiohttp

from pyworker.devtools.commands.routing import add_worker_target_arguments, worker_auth_data
from pyworker.workers.client_script import run_client, worker_answer

ANSWER_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_read=120)


def estimated_cost(payload: dict[str, Any]) -> float:
    """The worker's workload rule: max_new_tokens plus the prompt at 4 characters a token."""
    parameters = payload.get("parameters") or {}
    return float(parameters.get("max_new_tokens") or 100) + math.ceil(len(payload["inputs"]) / 4)


async def generate(
    session: aiohttp.ClientSession, auth_data: dict[str, Any], payload: dict[str, Any], stream: bool
) -> None:
    """Send the request through the worker; print the text (token by token when streaming)."""
    path = "/generate_stream" if stream else "/generate"
    async with worker_answer(session, auth_data, path, payload, ANSWER_TIMEOUT) as response:
        if not stream:
            answer = await response.json()
            print(answer["generated_text"])
            details = answer.get("details") or {}
            print(f"[{details.get('generated_tokens', '?')} tokens]")
            return
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            event = json.loads(line[5:])
            print(event["token"]["text"], end="", flush=True)
            if event.get("details"):
                print(f"\n[{event['details']['generated_tokens']} tokens]", end="")
    print()


async def main_async(arguments: argparse.Namespace) -> None:
    parameters: dict[str, Any] = {"max_new_tokens": arguments.max_new_tokens, "details": True}
    payload = {"inputs": arguments.prompt, "parameters": parameters}
    async with aiohttp.ClientSession() as session:
        auth_data = await worker_auth_data(session, arguments, estimated_cost(payload))
        await generate(session, auth_data, payload, stream=not arguments.no_stream)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate text through a tgi worker.")
    parser.add_argument("prompt")
    add_worker_target_arguments(parser, endpoint="tgi")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-stream", action="store_true", help="use /generate, not a stream")
    return run_client(main_async, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
