"""The benchmark still runs end to end (`bench/`); its figures are not checked here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SUBJECT_COLUMNS = ("model direct", "bare aiohttp proxy", "pyworker")
# The smoke run is a few seconds of load but CPU-bound: 30 s on an idle 2-core machine, past
# 120 s beside other test runs and a CPU hog. The guard only catches a run that hangs.
HANG_GUARD = 420


def run_smoke(*extra: str) -> subprocess.CompletedProcess[str]:
    """Run the smoke benchmark in a session of its own, so a hang leaves none of its servers."""
    command = [sys.executable, "-m", "bench.run", "--smoke", *extra]
    with subprocess.Popen(
        command,
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # bench.run and the servers it started
            out, err = process.communicate()
            hung = f"the smoke run hung past {HANG_GUARD} s:\n{err[-3000:]}"
            raise AssertionError(hung) from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.timeout(HANG_GUARD + 60)
@pytest.mark.parametrize("generator", ["auto", "python"])
def test_smoke_run_prints_every_subject_and_target(generator: str) -> None:
    completed = run_smoke("--generator", generator)

    assert completed.returncode == 0, completed.stderr[-3000:]
    table = completed.stdout
    header = next(line for line in table.splitlines() if line.startswith("| figure |"))
    for column in SUBJECT_COLUMNS:
        assert column in header
    for figure in ("requests/s at 64 connections", "RSS idle (MiB)", "stream: time to first chunk"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {figure}"))
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert len(cells) == len(SUBJECT_COLUMNS)
        assert all(cell and cell != "-" for cell in cells), row
    for target in ("throughput", "added p50 latency", "slow request", "idle RSS"):
        assert any(
            line.startswith("| ")
            and target in line
            and line.rstrip().endswith(("PASS |", "FAIL |", "n/a |"))
            for line in table.splitlines()
        ), target
    assert "20/20 ok" in table
    assert "forged signature with 401" in table
    assert "Command: `python -m bench.run --smoke" in table
