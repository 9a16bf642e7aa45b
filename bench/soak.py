"""A soak run: steady load on a real worker for a long time, with faults at intervals.

    python -m bench.soak --minutes 30
    python -m bench.soak --minutes 3 --interval 5 --fault-every 20   # a short proof run

It starts the local autoscaler (in this process; strict signatures), the demo model server and
`pyworker run` with PYWORKER_STRICT_AUTH=true, then keeps `--concurrency` clients busy (each
routes through the autoscaler, then calls the worker, plain or streamed) plus a trickle of
hostile requests (replays, forged costs, huge headers). Every `--fault-every` seconds it injects
the next fault in turn: the model server killed and restarted, the model server hung (SIGSTOP)
and resumed, the autoscaler down and back, the model's log deleted (and the model restarted,
writing a new one), a burst of slow-body clients.

Every `--interval` seconds it prints the worker's RSS, open file descriptors, connections and
threads, with the clients' outcomes in that interval. At the end it drains, checks that every
request the worker took was reported exactly once, and says whether RSS and descriptors stayed
flat. The exit status is 0 only if the worker survived, the accounting holds and nothing grew.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from pyworker.devtools.local.autoscaler import LocalAutoscaler
from pyworker.devtools.local.fleet import FinishedRequest, Fleet

REPOSITORY = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
ROUTE = "/v1/completions"
ENDPOINT = "soak"
BODY_TIMEOUT = 5.0
SOAK_TOKEN = "soak-token"
NOT_ACCOUNTED = frozenset({400, 401, 408, 410, 422, 503})
"""The worker's own answers before it accounts a request (`{"error": "..."}`, a string): it
must not report these. The same codes relayed from the model server are accounted."""
CONFIG = """
name = "soak"
[model_server]
base_url = "{model_url}"
log_file = "{log}"
health_path = "/health"
model_id = "demo"
load_patterns = ["Application startup complete."]
health_interval = 0.5
health_failures = 2
[[routes]]
path = "{route}"
workload = "max_tokens"
read_timeout = 2.0
[benchmark]
dataset = [{{ prompt = "benchmark", max_tokens = 16 }}]
rounds = 2
concurrency = 4
"""


# --- processes -----------------------------------------------------------------------------------


class Child:
    """A child process with its output in a file; stopped by its own pid only."""

    def __init__(self, name: str, output: Path) -> None:
        self.name = name
        self.output = output
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, arguments: Sequence[str], environ: dict[str, str]) -> str:
        """Start it and wait for its `listening on URL` line; returns the URL."""
        offset = self.output.stat().st_size if self.output.exists() else 0
        with self.output.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                *arguments,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                env=environ,
                cwd=REPOSITORY,
            )
        deadline = time.monotonic() + 60
        while True:
            found = LISTENING.findall(self.text(offset))
            if found:
                return str(found[-1])
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.text(offset)[-2000:]}")
            await asyncio.sleep(0.05)

    def text(self, offset: int = 0) -> str:
        try:
            with self.output.open("rb") as output:
                output.seek(offset)
                return output.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signum)

    async def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.kill()
            await self.process.wait()

    async def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            await self.kill()
            return None


def clean_environ() -> dict[str, str]:
    cleared = ("PYWORKER_", "MODEL_", "VAST_TCP_PORT_")
    names = {"CONTAINER_ID", "MASTER_TOKEN", "PUBLIC_IPADDR", "REPORT_ADDR", "UNSECURED"}
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith(cleared)}


# --- what is measured ----------------------------------------------------------------------------


@dataclass
class Tally:
    """Client outcomes in one interval."""

    ok: int = 0
    client_errors: collections.Counter[int] = field(default_factory=collections.Counter)
    server_errors: collections.Counter[int] = field(default_factory=collections.Counter)
    broken: int = 0
    waiting: int = 0
    refused_as_expected: int = 0
    unexpected: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def describe(self) -> str:
        def counts(counter: collections.Counter[int]) -> str:
            return ",".join(f"{code}:{n}" for code, n in sorted(counter.items())) or "-"

        return (
            f"ok {self.ok:5d}  4xx {counts(self.client_errors):<18} "
            f"5xx {counts(self.server_errors):<14} broken {self.broken:3d}  "
            f"no-worker {self.waiting:4d}  hostile-refused {self.refused_as_expected:3d}"
        )


@dataclass
class Sample:
    elapsed: float
    rss: int
    fds: int
    connections: int
    threads: int
    state: str
    awaiting_report: int
    failed_reports: int
    fault: str


class Soak:
    def __init__(self, arguments: argparse.Namespace, root: Path) -> None:
        self.arguments = arguments
        self.root = root
        self.autoscaler = LocalAutoscaler(ENDPOINT, fleet=Fleet(stale_after=None))
        self.reported: collections.Counter[int] = collections.Counter()
        self.answers: dict[int, int] = {}
        """request_idx -> the status the client got (0: the answer broke off)."""
        self.refused: set[int] = set()
        """request_idx the worker refused before accounting them."""
        self.model = Child("model server", root / "model.out")
        self.worker = Child("worker", root / "worker.out")
        self.model_log = root / "model.log"
        self.model_url = ""
        self.worker_url = ""
        self.autoscaler_port = 0
        self.tally = Tally()
        self.samples: list[Sample] = []
        self.fault = "-"
        self.failures: list[str] = []
        self.used_auth: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self._record_finished = self.autoscaler.record_finished
        self.autoscaler.record_finished = self._count_finished  # type: ignore[method-assign]
        self._process: psutil.Process | None = None

    def _count_finished(self, body: object) -> list[FinishedRequest]:
        entries = self._record_finished(body)
        self.reported.update(entry.request_idx for entry in entries)
        return entries

    # --- the pieces --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.autoscaler.start("127.0.0.1", 0)
        self.autoscaler_port = int(self.autoscaler.url.rsplit(":", 1)[1])
        await self.start_model()
        config = self.root / "worker.toml"
        config.write_text(CONFIG.format(model_url=self.model_url, log=self.model_log, route=ROUTE))
        environ = clean_environ() | {
            "REPORT_ADDR": self.autoscaler.url,
            "CONTAINER_ID": "1",
            "MASTER_TOKEN": SOAK_TOKEN,
            "PYWORKER_STRICT_AUTH": "true",
            "PYWORKER_REPORT_INTERVAL": "0.5",
            "PYWORKER_BODY_TIMEOUT": str(BODY_TIMEOUT),
            "PYWORKER_KEEPALIVE_TIMEOUT": "30",
            "PYWORKER_CACHE_DIR": str(self.root / "cache"),
            "WORKER_HOST": "127.0.0.1",
            "PYTHONPATH": str(REPOSITORY),
        }
        arguments = ["-m", "pyworker", "run", str(config), "--port", "0"]
        self.worker_url = await self.worker.start(arguments, environ)
        self._process = psutil.Process(self.worker.pid)

    async def start_model(self, port: int = 0) -> None:
        arguments = [
            "-m", "pyworker.devtools.demo.model_server", "--port", str(port),
            "--log-file", str(self.model_log), "--load-seconds", "1",
            "--tokens-per-second", "400",
        ]  # fmt: skip
        self.model_url = await self.model.start(arguments, clean_environ())

    @property
    def model_port(self) -> int:
        return int(self.model_url.rsplit(":", 1)[1])

    # --- load ----------------------------------------------------------------------------------
    async def client(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        while not self.stopping.is_set():
            answer = self.autoscaler.route(ENDPOINT, cost=float(rng.randint(8, 64)))
            if "url" not in answer:
                self.tally.waiting += 1
                await asyncio.sleep(0.2)
                continue
            payload = {
                "prompt": "soak",
                "max_tokens": int(answer["cost"]),
                "stream": rng.random() < 0.5,
            }
            self.used_auth.append(answer)
            status, refused = await self.call(session, answer, payload)
            self.answers[answer["request_idx"]] = status
            if refused:
                self.refused.add(answer["request_idx"])
            if status == 200:
                self.tally.ok += 1
            elif status == 0:
                self.tally.broken += 1
            elif status < 500:
                self.tally.client_errors[status] += 1
            else:
                self.tally.server_errors[status] += 1
            if status != 200:
                await asyncio.sleep(0.05)  # a client backs off a little after an error

    async def call(
        self, session: aiohttp.ClientSession, auth: dict[str, Any], payload: dict[str, Any]
    ) -> tuple[int, bool]:
        """The status (0: the answer broke off), and whether the worker refused it unaccounted."""
        body = {"auth_data": auth, "payload": payload}
        try:
            async with session.post(auth["url"] + ROUTE, json=body) as response:
                answer = await response.read()
                status = response.status
        except aiohttp.ClientConnectorError:
            return 503, True  # never reached the worker
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return 0, False
        if status not in NOT_ACCOUNTED:
            return status, False
        try:
            document = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return status, False
        return status, isinstance(document, dict) and isinstance(document.get("error"), str)

    async def hostile(self, session: aiohttp.ClientSession) -> None:
        """Replays, forged costs and huge headers: each must be refused, and change nothing."""
        while not self.stopping.is_set():
            await asyncio.sleep(1.0)
            if not self.used_auth:
                continue
            used = self.used_auth[0]
            forged = {**used, "cost": 100_000.0, "reqnum": used["reqnum"] + 10_000_000}
            for auth in (used, forged):
                expected, _ = await self.call(session, auth, {"prompt": "x", "max_tokens": 1})
                if expected in (401, 503):
                    self.tally.refused_as_expected += 1
                else:
                    self.tally.unexpected.append(f"hostile request answered {expected}")
            headers = {"X-Huge": "h" * 20_000}
            try:
                async with session.get(self.worker_url + "/health", headers=headers) as reply:
                    if reply.status in (400, 431):
                        self.tally.refused_as_expected += 1
                    else:
                        self.tally.unexpected.append(f"huge header answered {reply.status}")
            except aiohttp.ClientError:
                self.tally.refused_as_expected += 1

    # --- faults --------------------------------------------------------------------------------
    async def faults(self) -> None:
        kinds = [
            self.fault_model_killed,
            self.fault_model_hung,
            self.fault_autoscaler_down,
            self.fault_log_deleted,
            self.fault_slow_clients,
        ]
        index = 0
        while not self.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.arguments.fault_every)
                return
            fault = kinds[index % len(kinds)]
            index += 1
            self.fault = fault.__name__.removeprefix("fault_")
            self.tally.faults.append(self.fault)
            try:
                await fault()
            finally:
                self.fault = "-"

    async def fault_model_killed(self) -> None:
        port = self.model_port
        await self.model.kill()
        await asyncio.sleep(3)
        await self.start_model(port)

    async def fault_model_hung(self) -> None:
        self.model.send(signal.SIGSTOP)
        try:
            await asyncio.sleep(4)
        finally:
            self.model.send(signal.SIGCONT)

    async def fault_autoscaler_down(self) -> None:
        await self.autoscaler.stop()
        try:
            await asyncio.sleep(self.arguments.outage)
        finally:
            await self.autoscaler.start("127.0.0.1", self.autoscaler_port)

    async def fault_log_deleted(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.model_log.unlink()
        await asyncio.sleep(2)
        port = self.model_port
        await self.model.stop()
        await self.start_model(port)  # a restarted server writes a new log at the same path

    async def fault_slow_clients(self) -> None:
        port = int(self.worker_url.rsplit(":", 1)[1])

        async def slow() -> None:
            head = (
                f"POST {ROUTE} HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
                "Content-Length: 100000\r\n\r\n{"
            ).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            started = time.monotonic()
            try:
                while time.monotonic() - started < BODY_TIMEOUT + 5:
                    writer.write(b" ")
                    await writer.drain()
                    with contextlib.suppress(asyncio.TimeoutError):
                        answer = await asyncio.wait_for(reader.read(64), 0.5)
                        if answer.startswith(b"HTTP/1.1 408") or not answer:
                            self.tally.refused_as_expected += 1
                            return
                self.tally.unexpected.append("a slow body was not cut")
            except ConnectionError:
                self.tally.refused_as_expected += 1
            finally:
                writer.close()

        await asyncio.gather(*(slow() for _ in range(20)))

    # --- sampling ------------------------------------------------------------------------------
    async def sample(self, session: aiohttp.ClientSession) -> Sample:
        process = self._process
        assert process is not None
        state, awaiting, failed = "?", -1, -1
        try:
            operator = {"Authorization": f"Bearer {SOAK_TOKEN}"}  # /status in full
            async with session.get(self.worker_url + "/status", headers=operator) as response:
                document = await response.json()
                state = document["state"]
                awaiting = document["requests"]["finished_awaiting_report"]
                failed = document["reporter"]["failed"]
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            state = "no answer"
        with process.oneshot():
            sample = Sample(
                elapsed=time.monotonic() - self.started,
                rss=process.memory_info().rss,
                fds=process.num_fds(),
                connections=len(process.net_connections(kind="tcp")),
                threads=process.num_threads(),
                state=state,
                awaiting_report=awaiting,
                failed_reports=failed,
                fault=self.fault,
            )
        self.samples.append(sample)
        return sample

    def print_sample(self, sample: Sample, tally: Tally) -> None:
        print(
            f"{sample.elapsed:7.0f}s  {sample.state:<12} rss {sample.rss / 2**20:6.1f} MiB  "
            f"fds {sample.fds:4d}  tcp {sample.connections:4d}  thr {sample.threads:3d}  "
            f"unreported {sample.awaiting_report:4d}  failed-reports {sample.failed_reports:3d} | "
            f"{tally.describe()} | faults {','.join(tally.faults) or '-'}",
            flush=True,
        )
        for problem in tally.unexpected[:5]:
            self.failures.append(f"at {sample.elapsed:.0f}s: {problem}")
            print(f"         UNEXPECTED: {problem}", flush=True)

    async def watch(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.arguments.interval)
            tally, self.tally = self.tally, Tally()
            if not self.worker.alive:
                self.failures.append("the worker process died")
                print("         the worker process died", flush=True)
                self.stopping.set()
                return
            self.print_sample(await self.sample(session), tally)

    # --- the run -------------------------------------------------------------------------------
    async def run(self) -> int:
        minutes = self.arguments.minutes
        print(f"soak: {minutes:g} min, output in {self.root}", flush=True)
        await self.start()
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=5)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await self.wait_routable()
            print(f"worker ready at {self.worker_url}; load starts", flush=True)
            self.started = time.monotonic()
            rng = random.Random(self.arguments.seed)
            tasks = [
                asyncio.create_task(self.client(session, random.Random(rng.random())))
                for _ in range(self.arguments.concurrency)
            ]
            tasks += [
                asyncio.create_task(self.hostile(session)),
                asyncio.create_task(self.faults()),
                asyncio.create_task(self.watch(session)),
            ]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), minutes * 60)
            self.stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.settle(session)
        return self.verdict()

    async def wait_routable(self) -> None:
        deadline = time.monotonic() + 120
        while "url" not in self.autoscaler.route(ENDPOINT):
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never became ready")
            await asyncio.sleep(0.2)

    async def settle(self, session: aiohttp.ClientSession) -> None:
        """After the load: every fault over, wait for the last reports."""
        if not self.model.alive:
            await self.start_model(self.model_port)
        accounted = set(self.answers) - self.refused
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not accounted <= set(self.reported):
            await asyncio.sleep(0.2)
        self.print_sample(await self.sample(session), self.tally)

    def verdict(self) -> int:
        refused = self.refused
        broken = {i for i, s in self.answers.items() if s == 0}
        definite = set(self.answers) - refused - broken
        missing = definite - set(self.reported)
        twice = {i for i, n in self.reported.items() if n > 1}
        unknown = set(self.reported) - definite - broken
        print("\n== summary ==")
        print(
            f"requests: {len(self.answers)} ({len(definite)} answered, {len(broken)} broken off, "
            f"{len(refused)} refused before accounting); reported: {len(self.reported)}"
        )
        print(
            f"accounting: {len(missing)} answered but never reported, {len(twice)} reported "
            f"twice, {len(unknown)} reported but refused or unknown, "
            f"{len(broken - set(self.reported))} broken-off not reported"
        )
        if missing or twice or unknown:
            self.failures.append("accounting does not hold")
        flat = self.flatness()
        alive = self.worker.alive
        print(f"worker alive at the end: {alive}")
        if not alive:
            self.failures.append("the worker died")
        for failure in self.failures:
            print(f"FAIL: {failure}")
        ok = not self.failures and flat
        print("result: " + ("PASS" if ok else "FAIL"))
        return 0 if ok else 1

    def flatness(self) -> bool:
        """RSS and descriptors of the last third against the first sample after warm-up.

        Only samples taken between faults count: a fault in progress holds connections (and
        their descriptors) on purpose.
        """
        quiet = [sample for sample in self.samples if sample.fault == "-"]
        if len(quiet) < 4:
            print("too few samples to judge flatness")
            return True
        warm = quiet[max(1, len(quiet) // 6)]
        # Descriptors come and go with the model server's connections (a sample just after a
        # fault may catch them still closed): compare the most held early with the most late.
        early = quiet[max(1, len(quiet) // 6) : max(2, len(quiet) // 3)]
        late = quiet[-max(1, len(quiet) // 3) :]
        rss_late = max(s.rss for s in late)
        fds_early = max(s.fds for s in early)
        fds_late = max(s.fds for s in late)
        rss_growth = (rss_late - warm.rss) / 2**20
        rss_ok = rss_growth < max(10.0, warm.rss / 2**20 * 0.10)
        fds_ok = fds_late - fds_early <= 10
        print(
            f"RSS: {warm.rss / 2**20:.1f} MiB after warm-up, at most {rss_late / 2**20:.1f} MiB "
            f"in the last third ({rss_growth:+.1f} MiB): {'flat' if rss_ok else 'GROWING'}"
        )
        print(
            f"open fds: at most {fds_early} after warm-up, at most {fds_late} in the last third: "
            f"{'flat' if fds_ok else 'GROWING'}"
        )
        return rss_ok and fds_ok

    async def close(self) -> None:
        await self.worker.stop()
        await self.model.stop()
        await self.autoscaler.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults")
    parser.add_argument("--outage", type=float, default=20.0, help="autoscaler outage, seconds")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, help="folder for logs (default: a new temp one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    root = arguments.output or Path(tempfile.mkdtemp(prefix="pyworker-soak-"))
    root.mkdir(parents=True, exist_ok=True)

    async def run() -> int:
        soak = Soak(arguments, root)
        try:
            return await soak.run()
        finally:
            await soak.close()

    return asyncio.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
