"""A real llama.cpp `llama-server` for integration tests, and `pyworker run openai` before it.

The binary comes from `scripts/build-llama-server` (built from the llama-cpp-python sdist on
PyPI and cached under `.cache/llama-server/`); the models are tiny random-weight GGUF files
written by `tests/support/tiny_gguf.py`. Nothing is downloaded at test time but the sdist, and
only when the binary is not cached yet.

In CI (`CI` set) a missing binary is built here and a failed build fails the tests. Locally,
without the binary, the tests are skipped: run `scripts/build-llama-server` once (~5 minutes).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPOSITORY / "scripts" / "build-llama-server"
BUILD_TIMEOUT = 1800.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.02
MODEL_ALIAS = "tiny"
LISTENING = re.compile(r"listening on (http://[\w.:\[\]-]+)\s*$", re.MULTILINE)


def cached_binary() -> Path:
    """Where the build script keeps the binary for this version and these flags."""
    answer = subprocess.run(
        [str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True, check=True, timeout=30
    )
    return Path(answer.stdout.strip())


def is_usable(binary: Path) -> bool:
    if not binary.is_file():
        return False
    try:
        check = subprocess.run([str(binary), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0


def find_or_build_binary() -> Path:
    """The llama-server binary; built in CI when missing, skipped locally when missing."""
    binary = cached_binary()
    if is_usable(binary):
        return binary
    if not os.environ.get("CI"):
        pytest.skip(f"llama-server not built ({binary}); run scripts/build-llama-server")
    try:
        build = subprocess.run(
            [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/build-llama-server took over {BUILD_TIMEOUT:.0f} s")
    if build.returncode != 0 or not is_usable(binary):
        pytest.fail(
            f"scripts/build-llama-server failed ({build.returncode}):\n{build.stderr[-4000:]}"
        )
    return binary


def free_port() -> int:
    """A port free right now on loopback, for a server that must be named before it starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _read_from(path: Path, offset: int) -> str:
    """The complete lines of `path` from byte `offset`: a line being written is left out."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read(1 << 20)
    except OSError:
        return ""
    return data[: data.rfind(b"\n") + 1].decode(errors="replace")


def _tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def wait_for_line(
    path: Path,
    pattern: re.Pattern[str],
    process: subprocess.Popen[bytes],
    timeout: float,
    offset: int = 0,
) -> re.Match[str]:
    """Poll `path`, from byte `offset`, until a line matches; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(_read_from(path, offset))
        if match:
            return match
        if process.poll() is not None:
            raise AssertionError(f"{process.args!r} exited {process.returncode}:\n{_tail(path)}")
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"no line matching {pattern.pattern!r} in {path}:\n{_tail(path)}")


def stop_process(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(STOP_TIMEOUT)


@dataclass
class Process:
    """A server process whose log goes to the file `log`, as a start script would do it."""

    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def stop(self) -> int:
        return stop_process(self.process)

    def log_text(self) -> str:
        return _tail(self.log, 1 << 22)


def spawn_llama_server(
    binary: Path,
    model: Path,
    log: Path,
    *,
    port: int = 0,
    slots: int = 4,
    context_per_slot: int = 512,
    extra: tuple[str, ...] = (),
    default_threads: bool = False,
) -> Process:
    """Start llama-server with its output appended to `log`; do not wait for it.

    It has a thread per connection, held while the connection is open: a client with more
    connections than threads has the surplus wait. It gets twice the slots and 4, room for the
    tests' own polls of `/slots` beside the worker's connections, unless `default_threads`
    says to start it as users do, with its own default (the slots plus 2)."""
    command = [
        str(binary),
        "--model", str(model),
        "--alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", str(slots),
        "--ctx-size", str(slots * context_per_slot),
        "--threads", "1",
        "--no-webui",
        *(() if default_threads else ("--threads-http", str(2 * slots + 4))),
        *extra,
    ]  # fmt: skip
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Process(process, log)


def start_llama_server(
    binary: Path,
    model: Path,
    log: Path,
    *,
    port: int = 0,
    slots: int = 4,
    context_per_slot: int = 512,
    extra: tuple[str, ...] = (),
    default_threads: bool = False,
) -> Process:
    """Start llama-server (on a port of its choosing unless told) and wait until it listens,
    which it does once the model is loaded."""
    server = spawn_llama_server(
        binary,
        model,
        log,
        port=port,
        slots=slots,
        context_per_slot=context_per_slot,
        extra=extra,
        default_threads=default_threads,
    )
    offset = log.stat().st_size if log.exists() else 0  # the log may hold an earlier run's lines
    try:
        server.url = wait_for_line(log, LISTENING, server.process, START_TIMEOUT, offset).group(1)
    except BaseException:
        server.stop()
        raise
    return server


def spawn_worker(
    log: Path, environ: dict[str, str], *arguments: str, worker: str = "openai"
) -> Process:
    """Start `python -m pyworker run WORKER --port 0` from the repository; wait until it listens.

    Its log (stderr) goes to `log`, what it prints (stdout: where it listens) beside it in
    `<log>.out`, so that no log line can land in the middle of the address.
    """
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPOSITORY), WORKER_HOST="127.0.0.1", **environ)
    command = [sys.executable, "-m", "pyworker", "run", worker, "--port", "0", *arguments]
    printed = log.with_name(log.name + ".out")
    with log.open("ab") as errors, printed.open("ab") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=errors, stdin=subprocess.DEVNULL, env=env, cwd=log.parent
        )
    running = Process(process, log)
    try:
        running.url = wait_for_line(printed, LISTENING, process, START_TIMEOUT).group(1)
    except BaseException:
        running.stop()
        raise
    return running


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Poll the worker's `/ready` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker exited {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError:
            pass  # 503 until ready
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"worker {url} not ready after {timeout:.0f} s")
