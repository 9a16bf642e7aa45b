"""A terminal view of the fleet: a table rendered from `/fleet` data, redrawn in place.

On a terminal the table is redrawn over itself with ANSI escapes; anywhere else (a pipe, a log
file) it is printed as plain lines, and only when something other than the clock changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import aiohttp

_COLUMNS = (
    "ID",
    "STATE",
    "URL",
    "LOAD",
    "MAX PERF",
    "UTIL",
    "WORKING",
    "ROUTED",
    "DONE",
    "FAILED",
    "SEEN",
)
_NUMERIC = frozenset({"LOAD", "MAX PERF", "UTIL", "WORKING", "ROUTED", "DONE", "FAILED", "SEEN"})
_MAX_CELL = 40
_CURSOR_UP_AND_CLEAR = "\x1b[{lines}F\x1b[J"


def render_table(fleet: Mapping[str, Any], *, show_age: bool = True) -> str:
    """The table text for a `/fleet` answer; without `show_age` it leaves out the SEEN column."""
    columns = [column for column in _COLUMNS if show_age or column != "SEEN"]
    rows = [_row(worker, columns) for worker in fleet.get("workers", [])]
    widths = [
        max([len(column), *(len(row[index]) for row in rows)])
        for index, column in enumerate(columns)
    ]
    lines = [_summary(fleet), _line(columns, columns, widths)]
    for worker, row in zip(fleet.get("workers", []), rows, strict=True):
        lines.append(_line(row, columns, widths))
        if worker.get("error_msg"):
            lines.append(f"  └ error: {_clip(str(worker['error_msg']), 200)}")
    if not rows:
        lines.append("  (no worker has reported yet)")
    return "\n".join(lines)


def _summary(fleet: Mapping[str, Any]) -> str:
    workers = fleet.get("workers", [])
    counts = ", ".join(
        f"{count} {state}" for state, count in fleet.get("counts", {}).items() if count
    )
    finished = fleet.get("finished", {}).get("total", 0)
    endpoint = fleet.get("endpoint") or "(any endpoint)"
    noun = "worker" if len(workers) == 1 else "workers"
    breakdown = f" ({counts})" if counts else ""
    return f"endpoint {endpoint}: {len(workers)} {noun}{breakdown}; {finished} requests finished"


def _row(worker: Mapping[str, Any], columns: Sequence[str]) -> list[str]:
    finished: Mapping[str, int] = worker.get("finished", {})
    max_perf = float(worker.get("max_perf", 0.0))
    cur_load = float(worker.get("cur_load", 0.0))
    cells = {
        "ID": str(worker.get("id", "?")),
        "STATE": str(worker.get("state", "?")),
        "URL": _clip(str(worker.get("url") or "-"), _MAX_CELL),
        "LOAD": _number(cur_load),
        "MAX PERF": _number(max_perf),
        "UTIL": f"{100 * cur_load / max_perf:.0f}%" if max_perf > 0 else "-",
        "WORKING": str(worker.get("num_requests_working", 0)),
        "ROUTED": str(worker.get("routed", 0)),
        "DONE": str(sum(finished.values())),
        "FAILED": str(sum(n for status, n in finished.items() if status != "Success")),
        "SEEN": f"{float(worker.get('seconds_since_report', 0.0)):.0f}s ago",
    }
    return [cells[column] for column in columns]


def _line(cells: Sequence[str], columns: Sequence[str], widths: Sequence[int]) -> str:
    parts = [
        cell.rjust(width) if column in _NUMERIC else cell.ljust(width)
        for cell, column, width in zip(cells, columns, widths, strict=True)
    ]
    return "  ".join(parts).rstrip()


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())  # no control characters or newlines from a worker's report
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LiveTable:
    """Shows successive fleet snapshots on `stream`: redrawn in place on a TTY, else appended."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        if interactive is None:
            interactive = self.stream.isatty()
        self.interactive = interactive
        self._drawn_lines = 0
        self._last_plain = ""

    def update(self, fleet: Mapping[str, Any]) -> None:
        if self.interactive:
            width = shutil.get_terminal_size().columns
            lines = [line[:width] for line in render_table(fleet).splitlines()]
            erase = (
                _CURSOR_UP_AND_CLEAR.format(lines=self._drawn_lines) if self._drawn_lines else ""
            )
            self.stream.write(erase + "\n".join(lines) + "\n")
            self._drawn_lines = len(lines)
        else:
            text = render_table(fleet, show_age=False)
            if text == self._last_plain:
                return
            self._last_plain = text
            self.stream.write(text + "\n\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line below the table; the next update draws a fresh table under it."""
        self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn_lines = 0
        self._last_plain = ""


async def watch(
    url: str,
    table: LiveTable | None = None,
    *,
    interval: float = 1.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Poll `{url}/fleet` every `interval` seconds and show it, until `stop` is set."""
    table = table or LiveTable()
    stop = stop or asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=max(interval, 1.0) * 5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            try:
                async with session.get(
                    url.rstrip("/") + "/fleet", params={"history": "0"}
                ) as answer:
                    answer.raise_for_status()
                    fleet = await answer.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
                await asyncio.to_thread(table.note, f"cannot read the fleet: {error}")
            else:
                await asyncio.to_thread(table.update, fleet)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
