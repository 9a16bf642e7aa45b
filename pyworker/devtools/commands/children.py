"""Child processes of `pyworker dev`, each in its own session, stopped without leftovers.

A child runs in a new session (so its process group is its own: a Ctrl-C at the terminal
reaches `pyworker dev` only, which then stops the children in order) with its output copied
line by line to a log file, the last lines kept to explain a failure. Stopping a child sends
SIGTERM to its whole group, waits a bounded time, then SIGKILLs the group, so grandchildren
(a model server's own workers) go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pyworker.devtools.demo.lines import LineWriter

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
TAIL_LINES = 40
STOP_GRACE = 8.0
KILL_WAIT = 5.0
READER_WAIT = 2.0


class ChildExited(RuntimeError):
    """A child ended while it was still needed; the message names it and quotes its last lines."""


class Child:
    """One started process, the task copying its output, and what it printed last."""

    def __init__(
        self,
        name: str,
        process: asyncio.subprocess.Process,
        log_path: Path,
        writer: LineWriter | None,
    ) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.exited = asyncio.Event()
        self._writer = writer
        self._watches: list[tuple[re.Pattern[str], asyncio.Future[re.Match[str]]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._waiter = asyncio.create_task(self._wait(), name=f"wait-{name}")
        if process.stdout is not None:
            self._reader = asyncio.create_task(self._read(process.stdout), name=f"read-{name}")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def watch(self, pattern: re.Pattern[str]) -> asyncio.Future[re.Match[str]]:
        """A future for the first line of output, from now on, that matches `pattern`."""
        future: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
        self._watches.append((pattern, future))
        return future

    async def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first matching line; ChildExited if the child ends first, TimeoutError after."""
        future = self.watch(pattern)
        exited = asyncio.ensure_future(self.exited.wait())
        waits: set[asyncio.Future[Any]] = {future, exited}
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            exited.cancel()
        if future in done:
            return future.result()
        future.cancel()
        if exited in done:
            raise self.exit_error()
        raise TimeoutError(f"{self.name} printed no {pattern.pattern!r} line in {timeout:g} s")

    def exit_error(self) -> ChildExited:
        ended = f"the {self.name} exited with status {self.returncode}"
        if not self.tail:
            return ChildExited(f"{ended}; its output is in {self.log_path}")
        last = "\n".join(f"    {line}" for line in list(self.tail)[-15:])
        return ChildExited(f"{ended}; its last lines (all in {self.log_path}):\n{last}")

    async def _wait(self) -> None:
        await self.process.wait()
        self.exited.set()

    async def _read(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while True:
            chunk = await stream.read(CHUNK)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:  # an endless line is cut rather than held
                lines.append(pending)
                pending = b""
            for line in lines:
                self._line(line)
        if pending:
            self._line(pending)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self.tail.append(line)
        if self._writer is not None:
            self._writer.write(line)
        for pattern, future in self._watches:
            if not future.done():
                match = pattern.search(line)
                if match is not None:
                    future.set_result(match)
        self._watches = [(p, f) for p, f in self._watches if not f.done()]

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the group, wait up to `grace`, then SIGKILL it; always SIGKILL stragglers."""
        if self.returncode is None:
            signal_group(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), grace)
            except asyncio.TimeoutError:
                logger.warning("%s did not stop in %.0f s: killing it", self.name, grace)
                signal_group(self.pid, signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.exited.wait(), KILL_WAIT)
        signal_group(self.pid, signal.SIGKILL)  # anything left in its group
        await self.close()

    def kill(self) -> None:
        """SIGKILL the group now, from a signal handler or a last resort."""
        signal_group(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), READER_WAIT)
            self._reader.cancel()
        self._waiter.cancel()
        if self._writer is not None:
            await self._writer.close()
            self._writer = None


def signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


class Children:
    """The children of one session, stopped in the reverse order of their start."""

    def __init__(self) -> None:
        self.started: list[Child] = []

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        output_to_file: bool = False,
    ) -> Child:
        """Start `argv` in a new session; its output is copied to `log_path`.

        With `output_to_file` the output goes to the file directly instead (for a model server
        whose log the worker follows): no line is watched or kept then.
        """
        log_file: IO[bytes] | None = None
        writer: LineWriter | None = None
        if output_to_file:
            log_file = await asyncio.to_thread(log_path.open, "ab")
            stdout: int | IO[bytes] = log_file
        else:
            writer = LineWriter(log_path)
            await writer.start()
            stdout = subprocess.PIPE
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
            )
        except OSError:
            if writer is not None:
                await writer.close()
            raise
        finally:
            if log_file is not None:
                await asyncio.to_thread(log_file.close)
        child = Child(name, process, log_path, writer)
        self.started.append(child)
        return child

    def first_exited(self) -> Child | None:
        return next((child for child in self.started if child.returncode is not None), None)

    async def wait_any_exit(self) -> Child:
        """The first child to end (waits forever if none does)."""
        waits = {asyncio.create_task(child.exited.wait()): child for child in self.started}
        if not waits:
            await asyncio.Event().wait()
        try:
            done, _ = await asyncio.wait(set(waits), return_when="FIRST_COMPLETED")
        finally:
            for task in waits:
                task.cancel()
        return waits[next(iter(done))]

    async def stop_all(self, grace: float = STOP_GRACE) -> None:
        for child in reversed(self.started):
            await child.stop(grace)

    def kill_all(self) -> None:
        for child in self.started:
            child.kill()

    @property
    def pids(self) -> dict[str, int]:
        return {child.name: child.pid for child in self.started}
