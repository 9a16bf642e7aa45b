"""Child processes for end-to-end tests: started, found on their port, stopped by their pid."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

LISTENING = re.compile(rb"listening on (http://\S+)")


async def spawn(
    *arguments: str, env: dict[str, str], cwd: Path | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """Start `python ARGUMENTS` (in `cwd`, else this working folder); its URL from the
    `listening on URL` line it prints."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *arguments, stdout=asyncio.subprocess.PIPE, env=env, cwd=cwd
    )
    assert process.stdout is not None
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, f"{arguments} exited before listening"
        match = LISTENING.search(line)
        if match:
            return process, match.group(1).decode()


async def stop(process: asyncio.subprocess.Process) -> int:
    """SIGTERM, then its exit status (20 s at most)."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 20)
