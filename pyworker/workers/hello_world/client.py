"""A client of the hello_world endpoint: what your backend does to get an answer.

Two steps, the serverless protocol in full: ask the autoscaler for a worker (`POST /route/`,
polled until it names one), then send the payload to that worker with the signed auth_data.

    pyworker dev &                                  # or any autoscaler with a worker behind it
    python workers/hello_world/client.py "Tell me about GPUs"
    python workers/hello_world/client.py --vastai "Same, with the vastai SDK"

Without `--autoscaler` it uses the running `pyworker dev` (its `.pyworker/dev.json`).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from typing import Any

import aiohttp
import orjson

from pyworker.devtools.commands.dev.state import find_state
from pyworker.devtools.commands.routing import no_autoscaler_message

ENDPOINT = "hello_world"
ROUTE = "/v1/completions"


async def complete_with_aiohttp(autoscaler: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        ask = {"endpoint": ENDPOINT, "api_key": "", "cost": max_tokens, "request_idx": 0}
        for _ in range(120):  # about a minute of polling while no worker is ready
            async with session.post(f"{autoscaler}/route/", json=ask) as response:
                response.raise_for_status()
                auth_data: dict[str, Any] = await response.json()
            if "url" in auth_data:
                break
            ask["request_idx"] = auth_data.get("request_idx", 0)
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("no worker became ready")
        body = {
            "auth_data": auth_data,
            "payload": {"prompt": prompt, "max_tokens": max_tokens},
            "session_id": None,
        }
        async with session.post(auth_data["url"] + ROUTE, json=body) as response:
            response.raise_for_status()
            answer: dict[str, Any] = await response.json()
            return answer


async def complete_with_vastai(autoscaler: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The same request through vastai's `Serverless` client (`pip install vastai`)."""
    from vastai.serverless.client import Endpoint, Serverless

    class LocalServerless(Serverless):  # type: ignore[misc]
        async def get_ssl_context(self) -> ssl.SSLContext:
            # The SDK downloads Vast.ai's root certificate here; a local autoscaler needs none.
            return ssl.create_default_context()

    async with LocalServerless(api_key="local", autoscaler_url=autoscaler) as client:
        endpoint = Endpoint(client, name=ENDPOINT, id=0, api_key="local")
        payload = {"prompt": prompt, "max_tokens": max_tokens}
        result: dict[str, Any] = await endpoint.request(ROUTE, payload, cost=max_tokens)
    if not result["ok"]:
        raise RuntimeError(f"HTTP {result['status']}: {result['response']}")
    answer: dict[str, Any] = result["response"]
    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Say hello to the world.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--autoscaler", help="default: the running `pyworker dev`")
    parser.add_argument("--vastai", action="store_true", help="use the vastai SDK's client")
    arguments = parser.parse_args()
    state = None if arguments.autoscaler else find_state()
    autoscaler = arguments.autoscaler or (state.autoscaler if state else None)
    if not autoscaler:  # no guess: another service may listen where an autoscaler often does
        print(f"client.py: {no_autoscaler_message()}", file=sys.stderr)
        return 1
    complete = complete_with_vastai if arguments.vastai else complete_with_aiohttp
    answer = asyncio.run(complete(autoscaler.rstrip("/"), arguments.prompt, arguments.max_tokens))
    sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"\ntext: {answer['choices'][0]['text'].strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
