"""What a worker keeps of requests refused before their signature passes: its RSS, printed.

    python -m bench.unverified_memory --requests 40 --mib 4

A worker runs as `pyworker run` does in production (signatures checked against a stand-in
autoscaler's key, pyworker.protocol.auth), in front of the bench's fake model. One client sends
it `--requests` requests, one after the other, each with a different `--mib` MiB
`auth_data.url` and a `--mib` MiB `endpoint` and `signature`: every one is refused (401, the url
names no worker). The worker's RSS is printed before them, at its peak while they run
(sampled every 50 ms), and after them, once the worker had `--settle` seconds to give freed
memory back; then a valid request proves the worker still serves. Whatever the "after" figure
holds above "before" is what the worker kept of requests it refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from bench import autoscaler
from bench.processes import Fleet, PeakRss, ServerProcess
from bench.run import WORKER_TOML, auth_data, stand_in_autoscaler, wait_ready, worker_environment

MiB = 1024 * 1024


def refused_body(index: int, mib: int, signed: dict[str, object]) -> bytes:
    """An envelope whose big fields differ from every other request's (no cache can share)."""
    filler = f"{index:08d}" + "a" * (mib * MiB)
    auth = {
        **signed,
        "url": f"http://{filler}.example:8000",
        "endpoint": filler,
        "signature": "A" * (mib * MiB),
    }
    return orjson.dumps({"auth_data": auth, "payload": {"max_tokens": 1}})


async def send(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with session.post(url, data=body) as response:
        await response.read()
        return response.status


async def measure(requests: int, mib: int, settle: float) -> str:
    signer = autoscaler.Signer()
    reports = autoscaler.Reports()
    with tempfile.TemporaryDirectory(prefix="pyworker-unverified-") as temporary:
        workdir = Path(temporary)
        async with contextlib.AsyncExitStack() as stack:
            report_addr = await stack.enter_async_context(stand_in_autoscaler(signer, reports))
            fleet = Fleet()
            stack.push_async_callback(fleet.stop)
            model = fleet.add(
                ServerProcess.python("fake model", ["-m", "bench.fake_model"], workdir / "m", None)
            )
            config = workdir / "worker.toml"
            config.write_text(WORKER_TOML.format(model_url=await model.wait_listening()))
            worker = fleet.add(
                ServerProcess.python(
                    "pyworker",
                    ["-m", "pyworker", "run", str(config), "--host", "127.0.0.1", "--port", "0"],
                    workdir / "pyworker.log",
                    None,
                    environ=worker_environment(report_addr, workdir / "cache"),
                    cwd=workdir,
                )
            )
            url = await worker.wait_listening()
            await wait_ready(url)
            signed = auth_data(signer, url)
            valid = orjson.dumps({"auth_data": signed, "payload": {"max_tokens": 1}})
            session = await stack.enter_async_context(aiohttp.ClientSession())
            for index in range(3):  # warm up: the first requests' allocations are not kept ones
                await send(session, url + "/generate", valid)
                await send(session, url + "/generate", refused_body(index, 0, signed))
            await asyncio.sleep(settle)
            before = worker.rss()
            statuses: Counter[int] = Counter()
            with PeakRss(worker) as peak:
                for index in range(requests):
                    body = refused_body(index + 10, mib, signed)
                    statuses[await send(session, url + "/generate", body)] += 1
                    del body
            await asyncio.sleep(settle)
            after = worker.rss()
            still = await send(session, url + "/generate", valid)
    answers = ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
    return "\n".join(
        [
            f"{requests} refused requests, each with a {mib} MiB url, endpoint and signature",
            f"answers: {answers}; a valid request afterwards: {still}",
            f"worker RSS before: {before / MiB:7.1f} MiB",
            f"worker RSS peak:   {peak.peak / MiB:7.1f} MiB",
            f"worker RSS after:  {after / MiB:7.1f} MiB  (kept: {(after - before) / MiB:+.1f} MiB)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--mib", type=int, default=4, help="MiB of each big field")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before 'after'")
    options = parser.parse_args()
    print(asyncio.run(measure(options.requests, options.mib, options.settle)))


if __name__ == "__main__":
    main()
