"""Load generators: `wrk` when installed (C, one thread, cheap per request), else Python.

Both offer a closed loop (N connections, each sending again at once: throughput) and a
moderate fixed rate (latency without queueing). wrk has no fixed-rate mode, so each of 32
connections waits a random think time between requests (its Lua `delay()` hook), averaging
the rate asked for; the jitter keeps the connections from falling into step and arriving in
bursts, and think times long against the latency keep the achieved rate near the target.
wrk starts its latency clock when it writes the request, after the think time.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

RATE_CONNECTIONS = 32
WRK_TIMEOUT = "10s"
SUBPROCESS_GRACE = 30.0
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{delay}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_RESULT %d %d %d %d %f %f\\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""
WRK_DELAY = """\
function delay()
  return math.random({low}, {high})
end
"""


class LoadError(RuntimeError):
    """The load generator failed or printed nothing usable."""


@dataclass(slots=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class LoadGenerator(Protocol):
    name: str

    async def closed(
        self, url: str, body: bytes, connections: int, seconds: float
    ) -> LoadResult: ...

    async def fixed_rate(
        self, url: str, body: bytes, rate: float, seconds: float
    ) -> LoadResult: ...


async def _run(command: list[str], timeout: float) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        output, errors = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise LoadError(f"{command[0]} ran past {timeout:.0f}s") from None
    if process.returncode != 0:
        raise LoadError(f"{' '.join(command[:3])} failed: {errors.decode(errors='replace')}")
    return output.decode(errors="replace")


class Wrk:
    """wrk with a Lua script for the POST body; its threads run where this process is pinned."""

    name = "wrk"

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self._scripts = 0

    def _script(self, body: bytes, delay: str) -> Path:
        text = body.decode()
        if "]==]" in text:
            raise LoadError("the body cannot be embedded in a Lua long string")
        self._scripts += 1
        path = self.workdir / f"wrk-{self._scripts}.lua"
        path.write_text(WRK_SCRIPT.format(body=text, delay=delay))
        return path

    async def _wrk(self, url: str, script: Path, connections: int, seconds: float) -> LoadResult:
        duration = max(1, round(seconds))
        command = [
            self.executable,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            f"--timeout={WRK_TIMEOUT}",
            "-s",
            str(script),
            url,
        ]
        output = await _run(command, duration + SUBPROCESS_GRACE)
        for line in output.splitlines():
            if line.startswith("BENCH_RESULT "):
                fields = line.split()[1:]
                requests, micros, socket_errors, status_errors = (int(f) for f in fields[:4])
                return LoadResult(
                    requests=requests,
                    errors=socket_errors + status_errors,
                    seconds=micros / 1e6,
                    p50_ms=float(fields[4]) / 1000.0,
                    p99_ms=float(fields[5]) / 1000.0,
                )
        raise LoadError(f"wrk printed no result: {output[-500:]}")

    async def closed(self, url: str, body: bytes, connections: int, seconds: float) -> LoadResult:
        return await self._wrk(url, self._script(body, ""), connections, seconds)

    async def fixed_rate(self, url: str, body: bytes, rate: float, seconds: float) -> LoadResult:
        mean_ms = RATE_CONNECTIONS * 1000.0 / rate
        low, high = max(1, round(mean_ms * 0.5)), max(2, round(mean_ms * 1.5))
        script = self._script(body, WRK_DELAY.format(low=low, high=high))
        return await self._wrk(url, script, RATE_CONNECTIONS, seconds)


class PythonLoad:
    """`bench.pyload` processes, one per load core, merged; see its docstring for its limits."""

    name = "python"

    def __init__(self, workdir: Path, processes: int) -> None:
        self.workdir = workdir
        self.processes = max(1, processes)
        self._bodies = 0

    def _body_file(self, body: bytes) -> Path:
        self._bodies += 1
        path = self.workdir / f"body-{self._bodies}.json"
        path.write_bytes(body)
        return path

    async def _pyload(self, arguments: list[str], seconds: float) -> dict[str, object]:
        command = [sys.executable, "-m", "bench.pyload", *arguments]
        output = await _run(command, seconds + SUBPROCESS_GRACE)
        document = orjson.loads(output.strip().splitlines()[-1])
        if not isinstance(document, dict):
            raise LoadError("bench.pyload printed no result")
        return document

    async def closed(self, url: str, body: bytes, connections: int, seconds: float) -> LoadResult:
        body_file = str(self._body_file(body))
        shares = [connections // self.processes] * self.processes
        for index in range(connections % self.processes):
            shares[index] += 1
        common = ["--url", url, "--body-file", body_file, "--seconds", str(seconds)]
        arguments = [[*common, "--connections", str(share)] for share in shares if share > 0]
        results = await asyncio.gather(*(self._pyload(a, seconds) for a in arguments))
        return _merge(results)

    async def fixed_rate(self, url: str, body: bytes, rate: float, seconds: float) -> LoadResult:
        body_file = str(self._body_file(body))
        arguments = ["--url", url, "--body-file", body_file]
        arguments += ["--rate", str(rate), "--seconds", str(seconds)]
        return _merge([await self._pyload(arguments, seconds)])


def _merge(results: list[dict[str, object]]) -> LoadResult:
    latencies: list[float] = []
    requests = errors = 0
    seconds = 0.0
    for result in results:
        requests += int(str(result["requests"]))
        errors += int(str(result["errors"]))
        seconds = max(seconds, float(str(result["seconds"])))
        samples = result["latencies_ms"]
        if isinstance(samples, list):
            latencies.extend(float(value) for value in samples)
    return LoadResult(
        requests=requests,
        errors=errors,
        seconds=seconds,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
    )


def percentile(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(percent) - 1]


def choose_generator(wanted: str, workdir: Path, load_cores: int) -> LoadGenerator:
    """wrk if installed (or asked for), else the Python generator."""
    executable = shutil.which("wrk")
    if wanted == "wrk" and executable is None:
        raise LoadError("wrk is not installed (Debian: apt-get install wrk)")
    if wanted != "python" and executable is not None:
        return Wrk(executable, workdir)
    return PythonLoad(workdir, load_cores)
