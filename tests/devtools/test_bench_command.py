"""`pyworker bench WORKER`: the benchmark alone, against a running model server, as a table."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

from tests.support.batching_engine import BatchingEngine
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]
CONFIG = """
name = "sized"
[model_server]
base_url = "http://127.0.0.1:1"
[[routes]]
path = "/v1/completions"
workload = "max_tokens"
[benchmark]
dataset = [{ max_tokens = 8 }, { max_tokens = 12 }]
max_concurrency = 8
"""


def _environ() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPOSITORY)}


async def _bench(*arguments: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "bench", *arguments,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_environ(),
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_prints_the_capacity_curve_of_a_running_model_server(tmp_path: Path) -> None:
    config = tmp_path / "sized.toml"
    config.write_text(CONFIG)
    engine, url = await spawn(
        "-m", "tests.support.batching_engine", "--slots", "4", "--step", "0.002", env=_environ()
    )
    try:
        code, out, err = await _bench(str(config), "--url", url)
    finally:
        await stop(engine)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"sized /v1/completions at {url}"
    assert lines[1].split() == ["in", "flight", "units/s", "p50", "s", "p90", "s", "requests"]
    rows = [line.split() for line in lines[2:] if re.match(r"\s+\d+\s", line)]
    assert [int(row[0]) for row in rows] == [1, 2, 4, 8][: len(rows)] and len(rows) >= 3
    chosen = next(row for row in rows if row[-1] == "chosen")
    # The chosen N measured again gives the figure (its own was the highest of noisy ones).
    again = re.search(
        r"^measured again at (\d+) in flight: ([\d.]+)/s over \d+ windows$", out, re.M
    )
    figure = re.search(r"^max_perf ([\d.]+)/s at (\d+) in flight$", out, re.M)
    assert again is not None and again.group(1) == chosen[0], out
    assert figure is not None and figure.group(1) == again.group(2) and figure.group(2) == chosen[0]
    assert 0 < float(figure.group(1)) < 1.1 * BatchingEngine(4, 0.002).capacity
    assert re.search(r"^stopped: .+$", out, re.M) and "ceiling: 8 (configured)" in out
    assert "benchmark: 1 in flight" in err  # the steps, as they come, on stderr


async def test_a_server_that_is_not_there_is_exit_1(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    config = tmp_path / "sized.toml"
    config.write_text(CONFIG)
    code, out, err = await _bench(str(config), "--url", url, "--set", "benchmark.connect_wait=0.3")
    assert code == 1 and out == ""
    assert "pyworker bench: benchmark failed: model server refused connections" in err


async def test_a_bad_config_is_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "sized.toml"
    config.write_text(CONFIG.replace("max_concurrency = 8", "max_concurrency = 0"))
    code, _, err = await _bench(str(config))
    assert code == 2 and "benchmark.max_concurrency" in err
