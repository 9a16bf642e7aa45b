"""Bodies a client breaks, sent to `pyworker run` as a real process whose log is read.

A body that does not decode (bad gzip, deflate or brotli data), one cut short, one whose
chunked framing is wrong: the client gets a JSON 4xx, the log gets at most one INFO line and
never an ERROR or a traceback (any client could fill it), and the next request is served.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyworker.devtools.demo.model_server import LOADED_LINE

REPOSITORY = Path(__file__).resolve().parents[2]
ROUTE = "/v1/completions"
CONFIG = """
name = "bodies"
perf = 100.0
[model_server]
base_url = "{model_url}"
log_file = "{log}"
health_path = "/health"
load_patterns = ["{loaded}"]
[[routes]]
path = "{route}"
workload = "max_tokens"
"""
GOOD_BODY = json.dumps(
    {
        "auth_data": {
            "cost": 4,
            "endpoint": "local",
            "reqnum": 1,
            "request_idx": 1,
            "url": "http://worker",
            "signature": "not checked in local mode",
        },
        "payload": {"prompt": "hello", "max_tokens": 4},
    }
).encode()


def clean_environ() -> dict[str, str]:
    cleared = ("PYWORKER_", "MODEL_", "VAST_TCP_PORT_")
    names = {"CONTAINER_ID", "MASTER_TOKEN", "PUBLIC_IPADDR", "REPORT_ADDR", "WORKER_PORT"}
    return {
        name: value
        for name, value in os.environ.items()
        if name not in names and not name.startswith(cleared)
    }


class Child:
    """A process with its output (log included) in a file."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *arguments: str, environ: dict[str, str]) -> str:
        """Start it; its URL, from the `listening on URL` line it prints."""
        with self.output.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, *arguments], stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, env=environ, cwd=REPOSITORY,
            )  # fmt: skip
        self.wait_for("listening on http://")
        line = next(line for line in self.text().splitlines() if "listening on http://" in line)
        return line.split("listening on ", 1)[1].split()[0]

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Poll the output for `text` until the deadline, or until the process exits."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the output:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(20)


class Worker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = Child(root / "model.out")
        self.worker = Child(root / "worker.out")
        self.host = ""
        self.port = 0

    def start(self) -> None:
        log = self.root / "model.log"
        model_url = self.model.start(
            "-m", "pyworker.devtools.demo.model_server", "--port", "0", "--log-file", str(log),
            "--load-seconds", "0", "--tokens-per-second", "0", environ=clean_environ(),
        )  # fmt: skip
        config = self.root / "worker.toml"
        config.write_text(
            CONFIG.format(model_url=model_url, log=log, loaded=LOADED_LINE, route=ROUTE)
        )
        environ = clean_environ() | {"PYTHONPATH": str(REPOSITORY), "PYWORKER_BODY_TIMEOUT": "5"}
        arguments = ("-m", "pyworker", "run", str(config), "--port", "0")
        url = self.worker.start(*arguments, environ=environ)
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.worker.wait_for("-> ready")

    async def send(self, request: bytes, *, then_close: bool = False) -> bytes:
        """Raw bytes on a fresh connection; the answer until the worker closes it."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(request)
            await writer.drain()
            if then_close:
                return b""
            return await asyncio.wait_for(reader.read(), 20)
        finally:
            writer.close()

    def log_since(self, offset: int) -> str:
        return self.worker.text()[offset:]

    async def serves_a_valid_request(self) -> None:
        answer = await self.send(post(GOOD_BODY))
        assert status_of(answer) == 200, answer
        assert json.loads(body_of(answer))["usage"]["completion_tokens"] == 4


def post(body: bytes, *headers: str, length: int | None = None) -> bytes:
    lines = [
        f"POST {ROUTE} HTTP/1.1",
        "Host: worker",
        "Content-Type: application/json",
        "Connection: close",
        *headers,
    ]
    if not any(header.startswith("Transfer-Encoding") for header in headers):
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    started = Worker(tmp_path_factory.mktemp("bodies"))
    try:
        started.start()
        yield started
    finally:
        status = started.worker.stop()
        started.model.stop()
    assert status == 0, started.worker.text()[-3000:]
    # Nothing came late either (a hang-up is seen whenever the worker gets to it).
    log = started.worker.text()
    assert " ERROR " not in log and "Traceback" not in log, log


NOT_COMPRESSED = b"this is not compressed data at all " * 20
BROKEN = {
    "gzip, not gzip": post(NOT_COMPRESSED, "Content-Encoding: gzip"),
    "gzip, corrupt after its header": post(
        gzip.compress(GOOD_BODY)[:12] + NOT_COMPRESSED, "Content-Encoding: gzip"
    ),
    "deflate, not deflate": post(NOT_COMPRESSED, "Content-Encoding: deflate"),
    "deflate, cut short": post(zlib.compress(GOOD_BODY)[:20], "Content-Encoding: deflate"),
    "br, not brotli": post(NOT_COMPRESSED, "Content-Encoding: br"),
    "an unknown encoding": post(NOT_COMPRESSED, "Content-Encoding: x-unknown"),
    "gzip, cut short": post(gzip.compress(GOOD_BODY)[:30], "Content-Encoding: gzip"),
    "chunk size not hex": post(b"zz\r\nabc\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
    "chunk longer than said": post(b"3\r\nabcdefgh\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
    "not JSON": post(b'{"auth_data": {"cost": 1}, "payload": '),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_a_broken_body_is_a_json_4xx_and_at_most_one_info_line(
    worker: Worker, case: str
) -> None:
    offset = len(worker.worker.text())
    answer = await worker.send(BROKEN[case])
    assert status_of(answer) in (400, 413, 415, 422), answer
    assert b"application/json" in answer.partition(b"\r\n\r\n")[0].lower(), answer
    assert "error" in json.loads(body_of(answer))
    await worker.serves_a_valid_request()
    assert_quiet(worker.log_since(offset))


async def test_a_body_shorter_than_its_length_is_408_at_the_deadline(worker: Worker) -> None:
    offset = len(worker.worker.text())
    started = time.monotonic()
    answer = await worker.send(post(GOOD_BODY[:20], length=len(GOOD_BODY)))
    assert status_of(answer) == 408 and "error" in json.loads(body_of(answer))
    assert time.monotonic() - started >= 4  # PYWORKER_BODY_TIMEOUT=5, less a clock tick
    await worker.serves_a_valid_request()
    assert_quiet(worker.log_since(offset))


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_client_that_closes_mid_body_leaves_no_error(worker: Worker, framing: str) -> None:
    offset = len(worker.worker.text())
    if framing == "length":
        request = post(GOOD_BODY[:20], length=len(GOOD_BODY))
    else:
        request = post(b"5\r\n" + GOOD_BODY[:5], "Transfer-Encoding: chunked")
    await worker.send(request, then_close=True)
    await worker.serves_a_valid_request()
    assert_quiet(worker.log_since(offset))


def assert_quiet(log: str) -> None:
    """At most one INFO line about the broken request; no ERROR, WARNING or traceback."""
    lines = [line for line in log.splitlines() if line.strip()]
    assert not [line for line in lines if " ERROR " in line or " WARNING " in line], log
    assert "Traceback" not in log, log
    info = [line for line in lines if " INFO " in line and "pyworker.lifecycle" not in line]
    assert len(info) <= 1, log
    assert all(line[:4].isdigit() for line in lines), log  # only log lines, nothing loose
