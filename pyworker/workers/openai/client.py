"""A client of an `openai` worker: ask the autoscaler for a worker, then stream a chat answer.

    python -m pyworker.devtools.local.autoscaler --port 8081 &          # or the real autoscaler
    python workers/openai/client.py --autoscaler http://127.0.0.1:8081 "Tell me a joke"
    python workers/openai/client.py --worker http://127.0.0.1:3000 "Hi"   # UNSECURED worker

The two steps are the whole protocol: `POST {autoscaler}/route/` answers with signed
`auth_data` naming a worker (or a waiting status, to ask again), and the worker takes
`{"auth_data": ..., "payload": <the OpenAI request>}` on the OpenAI paths.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from pyworker.devtools.commands.routing import add_worker_target_arguments, worker_auth_data
from pyworker.workers.client_script import run_client, worker_answer

ANSWER_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_read=120)


def estimated_cost(payload: dict[str, Any]) -> float:
    """The worker's own workload rule, roughly: prompt characters / 4 plus max_tokens."""
    text = "".join(str(message.get("content", "")) for message in payload.get("messages", []))
    return len(text) / 4 + float(payload.get("max_tokens", 256))


async def stream_chat(
    session: aiohttp.ClientSession, auth_data: dict[str, Any], payload: dict[str, Any]
) -> None:
    """Send the chat request through the worker and print the answer as it arrives."""
    path = "/v1/chat/completions"
    async with worker_answer(session, auth_data, path, payload, ANSWER_TIMEOUT) as response:
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                print(choice.get("delta", {}).get("content") or "", end="", flush=True)
            if chunk.get("usage"):
                usage = chunk["usage"]
                print(f"\n[{usage['prompt_tokens']} + {usage['completion_tokens']} tokens]")
    print()


async def main_async(arguments: argparse.Namespace) -> None:
    payload: dict[str, Any] = {
        "messages": [{"role": "user", "content": arguments.prompt}],
        "max_tokens": arguments.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if arguments.model:
        payload["model"] = arguments.model
    async with aiohttp.ClientSession() as session:
        auth_data = await worker_auth_data(session, arguments, estimated_cost(payload))
        await stream_chat(session, auth_data, payload)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stream a chat answer from an openai worker.")
    parser.add_argument("prompt")
    add_worker_target_arguments(parser, endpoint="openai")
    parser.add_argument("--model", default="", help="model name, if the server checks it")
    parser.add_argument("--max-tokens", type=int, default=256)
    return run_client(main_async, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
