"""Fault injection end to end, with real processes: `pyworker run` (strict signatures) in front of
the demo model server, reporting to a recording autoscaler that this test can take down.

In every scene the worker must stay up, answer clients with the right errors, report its state
truthfully, and account every request it took exactly once: each request_idx that got an
answer other than 401, 422 or 503 appears in exactly one `/delete_requests/` item.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pyworker.devtools.demo.model_server import LOADED_LINE
from pyworker.protocol.messages import DELETE_REQUESTS_PATH, PUBKEY_PATH, STATUS_PATH
from pyworker.protocol.strict import SignedRequest, strict_fields
from tests.conftest import KeyPair, wait_until

REPOSITORY = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
ROUTE = "/v1/completions"
FIFO_ROUTE = "/fifo"
READ_TIMEOUT = 1.0
NOT_ACCOUNTED = frozenset({401, 422, 503})
PAYLOAD_MARK = "payload-mark-31c9"
TOKEN = "fault-token-6d02"
CONFIG = """
name = "faults"
[model_server]
base_url = "{model_url}"
log_file = "{log}"
health_path = "/health"
model_id = "demo"
load_patterns = ["{loaded}"]
error_patterns = ["CUDA out of memory"]
health_interval = 0.2
health_failures = 2
[[routes]]
path = "{route}"
workload = "max_tokens"
read_timeout = {read_timeout}
[[routes]]
path = "{fifo}"
upstream_path = "{route}"
fifo = true
workload = "max_tokens"
read_timeout = {read_timeout}
[benchmark]
dataset = [{{ prompt = "benchmark", max_tokens = 4 }}]
rounds = 1
concurrency = 2
cache_file = "{cache_file}"
reference_file = "{reference_file}"
"""


def clean_environ() -> dict[str, str]:
    cleared = ("PYWORKER_", "MODEL_", "VAST_TCP_PORT_")
    names = {"CONTAINER_ID", "MASTER_TOKEN", "PUBLIC_IPADDR", "REPORT_ADDR", "UNSECURED"}
    return {
        name: value
        for name, value in os.environ.items()
        if name not in names and not name.startswith(cleared)
    }


class RecordingAutoscaler:
    """Serves the public key and records reports; it can go away and come back on its port."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.status: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(PUBKEY_PATH, self._pubkey)
        app.router.add_post(STATUS_PATH, self._worker_status)
        app.router.add_post(DELETE_REQUESTS_PATH, self._delete_requests)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _pubkey(self, request: web.Request) -> web.Response:
        return web.Response(body=self.pem)

    async def _worker_status(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert body["mtoken"] == TOKEN
        self.status.append(body)
        return web.json_response({"ok": True})

    async def _delete_requests(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.finished.extend(body["requests"])
        return web.json_response({"ok": True})

    def reported(self) -> collections.Counter[int]:
        return collections.Counter(item["request_idx"] for item in self.finished)


class Process:
    """A child process with its output in a file, stopped by its own pid only."""

    def __init__(self, name: str, output: Path) -> None:
        self.name = name
        self.output = output
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, *arguments: str, environ: dict[str, str]) -> str:
        """Start it and wait for its `listening on URL` line; returns the URL."""
        with self.output.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                PYTHON,
                *arguments,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
                env=environ,
                cwd=REPOSITORY,
            )
        offset = self.output.stat().st_size if self.output.exists() else 0
        deadline = time.monotonic() + 30
        while True:
            found = LISTENING.findall(self.text()[offset:])
            if found:
                return str(found[-1])
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.text()[-3000:]}")
            await asyncio.sleep(0.02)

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()
            await self.process.wait()

    async def stop(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)


class Scene:
    def __init__(self, root: Path, keypair: KeyPair) -> None:
        self.root = root
        self.keypair = keypair
        self.autoscaler = RecordingAutoscaler(keypair.pem)
        self.model = Process("model server", root / "model.out")
        self.worker = Process("worker", root / "worker.out")
        self.model_log = root / "model.log"
        self.model_url = ""
        self.worker_url = ""
        self.cache_file = root / "cache" / "benchmark.json"
        self.reference_file = root / "has_benchmark"
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), headers={"Authorization": f"Bearer {TOKEN}"}
        )
        self.answers: dict[int, int] = {}
        """request_idx -> what the client got (a status, or 0 for a broken answer)."""
        self._next_idx = 0

    # --- the processes -------------------------------------------------------------------
    async def start_model(self, port: int = 0) -> None:
        self.model_url = await self.model.start(
            "-m", "pyworker.devtools.demo.model_server", "--port", str(port),
            "--log-file", str(self.model_log), "--load-seconds", "0.2",
            "--tokens-per-second", "100", environ=clean_environ(),
        )  # fmt: skip

    @property
    def model_port(self) -> int:
        return int(self.model_url.rsplit(":", 1)[1])

    async def start_worker(self, wait_ready: bool = True) -> None:
        config = self.root / "worker.toml"
        config.write_text(
            CONFIG.format(
                model_url=self.model_url,
                log=self.model_log,
                loaded=LOADED_LINE,
                route=ROUTE,
                fifo=FIFO_ROUTE,
                read_timeout=READ_TIMEOUT,
                cache_file=self.cache_file,
                reference_file=self.reference_file,
            )
        )
        environ = clean_environ() | {
            "REPORT_ADDR": self.autoscaler.url,
            "CONTAINER_ID": "17",
            "MASTER_TOKEN": TOKEN,
            "PYWORKER_STRICT_AUTH": "true",
            "PYWORKER_REPORT_INTERVAL": "0.1",
            "PYWORKER_GRACE": "2",
            "WORKER_HOST": "127.0.0.1",
            "PYTHONPATH": str(REPOSITORY),
        }
        arguments = ("-m", "pyworker", "run", str(config), "--port", "0")
        self.worker_url = await self.worker.start(*arguments, environ=environ)
        if wait_ready:
            await self.wait_state("ready")

    # --- what the worker says ------------------------------------------------------------
    async def worker_status(self) -> dict[str, Any]:
        async with self.session.get(self.worker_url + "/status") as response:
            assert response.status == 200
            document: dict[str, Any] = await response.json()
            return document

    async def wait_state(self, state: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            document = await self.worker_status()
            if document["state"] == state:
                return document
            if time.monotonic() > deadline:
                raise AssertionError(f"worker never {state}: {document['state']}")
            await asyncio.sleep(0.05)

    def mark(self) -> int:
        """Where the reports received so far end; pass it to `wait_report` as `since`."""
        return len(self.autoscaler.status)

    async def wait_report(
        self, predicate: Callable[[dict[str, Any]], bool], since: int = 0
    ) -> dict[str, Any]:
        """The first report received after the `since`-th that `predicate` accepts."""
        reports = self.autoscaler.status
        await wait_until(lambda: any(map(predicate, reports[since:])), 20)
        return next(report for report in reports[since:] if predicate(report))

    # --- clients -------------------------------------------------------------------------
    def auth(self, cost: float = 1.0) -> dict[str, Any]:
        self._next_idx += 1
        fields: dict[str, Any] = {
            "url": self.worker_url,
            "endpoint": "faults",
            "request_idx": self._next_idx,
            "reqnum": self._next_idx,
            "cost": cost,
        }
        expires = round(time.time() + 60)
        strict = strict_fields(self.keypair.private, SignedRequest(**fields, expires=expires))
        return {**fields, "signature": self.keypair.sign(self.worker_url), **strict}

    async def request(
        self, max_tokens: int = 4, *, stream: bool = False, route: str = ROUTE
    ) -> tuple[int, bytes]:
        """One signed request; status 0 when the answer broke off."""
        auth = self.auth()
        payload = {"prompt": PAYLOAD_MARK, "max_tokens": max_tokens, "stream": stream}
        body = {"auth_data": auth, "payload": payload}
        try:
            async with self.session.post(self.worker_url + route, json=body) as response:
                status = response.status
                data = await response.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            status, data = 0, b""
        self.answers[auth["request_idx"]] = status
        return status, data

    # --- the final checks ----------------------------------------------------------------
    async def check_accounting(self) -> None:
        """Every accounted request_idx reported exactly once, and nothing else."""
        accounted = {idx for idx, status in self.answers.items() if status not in NOT_ACCOUNTED}
        await wait_until(lambda: set(self.autoscaler.reported()) >= accounted, 20)
        document = await self.worker_status()
        assert document["requests"]["finished_awaiting_report"] == 0
        counts = self.autoscaler.reported()
        assert set(counts) == accounted, (counts, self.answers)
        assert all(count == 1 for count in counts.values()), counts
        for item in self.autoscaler.finished:
            status = self.answers[item["request_idx"]]
            assert item["success"] is (200 <= status < 300), (item, status)

        def received() -> int:
            return sum(report["num_requests_recieved"] for report in self.autoscaler.status)

        await wait_until(lambda: received() >= len(accounted), 20)
        assert received() == len(accounted)

    async def finish(self) -> None:
        assert self.worker.running, self.worker.text()[-3000:]
        await self.check_accounting()
        assert await self.worker.stop() == 0
        log = self.worker.text()
        for secret in (PAYLOAD_MARK, TOKEN, self.keypair.sign(self.worker_url)[:40]):
            assert secret not in log, secret

    async def close(self) -> None:
        await self.session.close()
        await self.worker.kill()
        await self.model.kill()
        await self.autoscaler.stop()


@pytest.fixture
async def scene(tmp_path: Path, keypair: KeyPair) -> AsyncIterator[Scene]:
    scene = Scene(tmp_path, keypair)
    await scene.autoscaler.start()
    try:
        yield scene
    finally:
        await scene.close()


# --- the scenes ------------------------------------------------------------------------------


async def test_model_server_killed_mid_stream(scene: Scene) -> None:
    await scene.start_model()
    await scene.start_worker()
    assert (await scene.request())[0] == 200
    since = scene.mark()

    auth_payload = {"prompt": PAYLOAD_MARK, "max_tokens": 500, "stream": True}
    auth = scene.auth()
    body = {"auth_data": auth, "payload": auth_payload}
    broken = False
    async with scene.session.post(scene.worker_url + ROUTE, json=body) as response:
        assert response.status == 200
        await response.content.readuntil(b"\n\n")  # the first token is on its way
        await scene.model.kill()
        try:
            rest = await response.read()
            broken = b"[DONE]" not in rest
        except aiohttp.ClientPayloadError:
            broken = True
    assert broken
    scene.answers[auth["request_idx"]] = 0

    status, answer = await scene.request()
    assert status in (502, 503), answer  # unreachable, or already known to be down
    errored = await scene.wait_report(lambda report: "health" in report["error_msg"], since)
    assert errored["max_perf"] == 0.0
    status, answer = await scene.request()
    assert status == 503 and b"errored" in answer

    since = scene.mark()
    await scene.start_model(scene.model_port)  # back on the same port: it logs its load line
    await scene.wait_state("ready")
    recovered = await scene.wait_report(lambda report: report["max_perf"] > 0, since)
    assert recovered["error_msg"] == ""
    assert (await scene.request(stream=True))[0] == 200
    await scene.finish()


async def test_model_server_hanging(scene: Scene) -> None:
    await scene.start_model()
    await scene.start_worker()
    assert (await scene.request())[0] == 200
    scene.model.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        plain, fifo_first, fifo_second = await asyncio.gather(
            scene.request(),
            scene.request(route=FIFO_ROUTE),
            scene.request(route=FIFO_ROUTE),
        )
        took = time.monotonic() - started
    finally:
        scene.model.signal(signal.SIGCONT)
    assert plain[0] == 504 and b"timed out" in plain[1]
    assert fifo_first[0] == fifo_second[0] == 504  # a hung model does not hold the FIFO queue
    assert took < 3 * READ_TIMEOUT + 2
    document = await scene.worker_status()
    assert document["requests"]["in_progress"] == 0
    assert (await scene.request(route=FIFO_ROUTE))[0] == 200
    await scene.finish()


async def test_autoscaler_down_then_back(scene: Scene) -> None:
    await scene.start_model()
    await scene.autoscaler.stop()  # down before the worker even starts: no key, no reports
    await scene.start_worker(wait_ready=False)
    status, answer = await scene.request()
    assert status == 503, answer
    await scene.autoscaler.start()
    await scene.wait_state("ready")
    assert (await scene.request())[0] == 200
    await wait_until(lambda: 2 in scene.autoscaler.reported())
    await scene.wait_report(lambda report: report["num_requests_recieved"] == 1)

    await scene.autoscaler.stop()  # down again, mid-run, for many report intervals
    failed = (await scene.worker_status())["reporter"]["failed"]
    outage = [await scene.request(max_tokens=n) for n in (1, 2, 3, 4, 5)]
    assert [status for status, _ in outage] == [200] * 5
    deadline = time.monotonic() + 20
    while (await scene.worker_status())["reporter"]["failed"] < failed + 10:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    document = await scene.worker_status()
    assert document["requests"]["finished_awaiting_report"] >= 5
    assert document["state"] == "ready"

    since = scene.mark()
    await scene.autoscaler.start()
    news = await scene.wait_report(lambda report: report["num_requests_recieved"] > 0, since)
    assert news["num_requests_recieved"] == 5
    assert news["new_load"] == 1 + 2 + 3 + 4 + 5  # nothing lost while away
    await scene.finish()


async def test_log_file_deleted_and_recreated(scene: Scene) -> None:
    await scene.start_model()
    await scene.start_worker()
    scene.model_log.unlink()
    assert (await scene.request())[0] == 200  # the log going away changes nothing by itself
    since = scene.mark()
    scene.model_log.write_text("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    report = await scene.wait_report(lambda report: "CUDA out of memory" in report["error_msg"])
    assert scene.autoscaler.status.index(report) >= since
    assert report["max_perf"] == 0.0
    assert (await scene.request())[0] == 503
    document = await scene.worker_status()
    assert document["log"]["rotations"] >= 1
    since = scene.mark()
    with scene.model_log.open("a") as log:
        log.write(f"INFO:     {LOADED_LINE}\n")  # the restarted server, in the new file
    await scene.wait_state("ready")
    await scene.wait_report(
        lambda report: report["max_perf"] > 0 and not report["error_msg"], since
    )
    assert (await scene.request())[0] == 200
    await scene.finish()


async def test_benchmark_cache_cannot_be_written(scene: Scene) -> None:
    blocker = scene.root / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    scene.cache_file = blocker / "benchmark.json"
    scene.reference_file = Path("/dev/full")  # a device: never written into
    await scene.start_model()
    await scene.start_worker()
    report = await scene.wait_report(lambda report: report["max_perf"] > 0)
    assert report["error_msg"] == "" and report["loadtime"] > 0
    assert (await scene.request())[0] == 200
    log = scene.worker.text()
    assert "benchmark cache" in log and "not written" in log
    assert "/dev/full is a character device, not a regular file: not used" in log
    await scene.finish()


async def test_own_files_that_are_not_regular_files_are_never_read_or_written_through(
    scene: Scene,
) -> None:
    victim = scene.root / "elsewhere"
    victim.write_text("not the worker's")
    scene.cache_file.parent.mkdir()
    scene.cache_file.symlink_to("/dev/zero")  # read whole, it fills memory
    scene.reference_file.symlink_to(victim)
    await scene.start_model()
    real_log = scene.root / "model.real"
    scene.model_log.rename(real_log)  # the model server goes on writing there
    os.mkfifo(scene.model_log)  # opened for reading, it would wait for a writer
    await scene.start_worker(wait_ready=False)
    log = scene.model_log

    async def warned(what: str) -> None:
        await wait_until(lambda: f"log {log} is {what}" in scene.worker.text(), 20)

    await warned("a FIFO")
    log.unlink()
    log.mkdir()
    await warned("a directory")
    log.rmdir()
    log.symlink_to("/dev/zero")  # read, it never ends
    await warned("a character device")
    log.unlink()
    log.symlink_to(real_log)  # a link to a regular file is followed
    await scene.wait_state("ready")
    report = await scene.wait_report(lambda report: report["max_perf"] > 0)
    assert report["error_msg"] == ""
    assert (await scene.request())[0] == 200

    assert victim.read_text() == "not the worker's"
    assert not scene.reference_file.is_symlink() and float(scene.reference_file.read_text()) > 0
    assert not scene.cache_file.is_symlink()
    assert json.loads(scene.cache_file.read_bytes())["perf"] > 0  # measured, then cached
    text = scene.worker.text()
    waiting = "not a regular file; waiting for a regular file there"
    for what in ("a FIFO", "a directory", "a character device"):
        assert text.count(f"log {log} is {what}, {waiting}") == 1, text[-3000:]
    assert text.count(f"{scene.cache_file} is a symbolic link") == 1, text[-3000:]
    assert "MemoryError" not in text and "Traceback" not in text
    await scene.finish()


async def test_replayed_and_forged_requests_are_refused_by_the_process(scene: Scene) -> None:
    await scene.start_model()
    await scene.start_worker()
    auth = scene.auth()
    body = {"auth_data": auth, "payload": {"prompt": PAYLOAD_MARK, "max_tokens": 2}}
    statuses = []
    for _ in range(3):
        async with scene.session.post(scene.worker_url + ROUTE, json=body) as response:
            statuses.append(response.status)
    assert statuses == [200, 401, 401]
    scene.answers[auth["request_idx"]] = 200
    reference_only = {key: auth[key] for key in auth if key not in ("sig_v", "expires")}
    forged = {**scene.auth(), "cost": 10_000}
    for auth_data in (reference_only, forged):
        body = {"auth_data": auth_data, "payload": {"prompt": "x", "max_tokens": 1}}
        async with scene.session.post(scene.worker_url + ROUTE, json=body) as response:
            assert response.status == 401
    await scene.finish()
