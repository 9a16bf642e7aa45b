"""The benchmark's server processes: started, pinned to a core, measured and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import psutil

LISTENING = re.compile(rb"listening on (http://[\w.\-\[\]:]+)")
START_TIMEOUT = 30.0
POLL_INTERVAL = 0.02
LOG_TAIL = 2000


class StartError(RuntimeError):
    """A server process exited or never said where it listens."""


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(pid: int, core: int | None) -> None:
    """Pin every thread of `pid` to `core` (a thread keeps the mask it was created with)."""
    if core is not None:
        allow(pid, {core})


def allow(pid: int, cores: set[int]) -> None:
    """Let every thread of `pid` run on `cores`."""
    try:
        thread_ids = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        thread_ids = [pid]
    for thread_id in thread_ids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(thread_id, cores)


@contextlib.contextmanager
def cores_apart(engine: int) -> Iterator[None]:
    """The process `engine` on the first usable core, this process (every thread) and what it
    starts from now on (a child inherits the mask) on the second, as a GPU engine's work is
    out of its front's way; this process's cores are given back after. Nothing moves on one
    core."""
    cores = usable_cores()
    if len(cores) < 2:
        yield
        return
    pin(engine, cores[0])
    pin(os.getpid(), cores[1])
    try:
        yield
    finally:
        allow(os.getpid(), set(cores))


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class ServerProcess:
    """A child process serving HTTP, with its log in a file and its costs read from /proc."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        core: int | None,
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.core = core
        self.url = ""
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ if environ is None else environ),
                cwd=cwd,
            )
        pin(self.popen.pid, core)
        self.process = psutil.Process(self.popen.pid)

    @classmethod
    def python(
        cls,
        name: str,
        arguments: Sequence[str],
        log_path: Path,
        core: int | None,
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ServerProcess:
        return cls(name, [sys.executable, *arguments], log_path, core, environ, cwd)

    async def wait_listening(self, timeout: float = START_TIMEOUT) -> str:
        """Wait for the `listening on URL` line; returns the URL."""
        deadline = time.monotonic() + timeout
        while True:
            text = await asyncio.to_thread(self.log_path.read_bytes)
            found = LISTENING.search(text)
            if found:
                self.url = found.group(1).decode()
                return self.url
            if self.popen.poll() is not None:
                raise StartError(f"{self.name} exited ({self.popen.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} did not listen in {timeout}s: {self.log_tail()}")
            await asyncio.sleep(POLL_INTERVAL)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_bytes()[-LOG_TAIL:].decode(errors="replace")
        except OSError:
            return ""

    def move_to(self, core: int | None) -> None:
        self.core = core
        pin(self.popen.pid, core)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def wait(self, timeout: float) -> None:
        """Wait for the process to end (blocking), killing it at the deadline."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout)


class Fleet:
    """The server processes of a run, stopped together (SIGTERM first, so pyworker drains)."""

    def __init__(self) -> None:
        self.processes: list[ServerProcess] = []

    def add(self, process: ServerProcess) -> ServerProcess:
        self.processes.append(process)
        return process

    async def stop(self, timeout: float = 15.0) -> None:
        for process in self.processes:
            process.terminate()
        # Waiting in a thread keeps this loop serving pyworker's final report as it drains.
        for process in self.processes:
            await asyncio.to_thread(process.wait, timeout)


class PeakRss:
    """Samples a process's RSS from a thread while load runs; `peak` is the highest seen."""

    def __init__(self, server: ServerProcess, interval: float = 0.05) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.server.rss())
            if self._stop.wait(self.interval):
                return


def busy_percent(interval: float = 0.5) -> float:
    """Share of all cores busy over `interval` seconds (blocking: call it from a thread)."""
    return float(psutil.cpu_percent(interval=interval))


async def wait_until_quiet(threshold: float, patience: float) -> float:
    """Wait (up to `patience` s) until other processes leave the machine mostly idle.

    Between measurements the benchmark's own processes are idle, so what keeps the cores
    busy then is someone else, who would skew the next measurement. Returns the last busy
    share seen, so a measurement taken on a busy machine can be flagged.
    """
    deadline = time.monotonic() + patience
    while True:
        busy = await asyncio.to_thread(busy_percent)
        if busy <= threshold or time.monotonic() > deadline:
            return busy
