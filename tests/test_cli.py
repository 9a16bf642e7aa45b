"""`pyworker run` as a real process in front of a model server, on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from tests.conftest import KeyPair, ModelServer


def _environ(**extra: str) -> dict[str, str]:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("CONTAINER_ID", "REPORT_ADDR", "UNSECURED")
    }
    environ.update(extra)
    return environ


async def _start(config: Path, **env: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(config), "--port", "0",
        stdout=asyncio.subprocess.PIPE,
        env=_environ(**env),
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    match = re.search(rb"listening on (http://\S+)", line)
    assert match, line
    return process, match.group(1).decode()


async def test_run_serves_a_toml_worker_and_stops_on_sigterm(
    tmp_path: Path, model_server: ModelServer, keypair: KeyPair
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[model_server]\nbase_url = "{model_server.url}"\nhealth_path = "/health"\n'
        '[[routes]]\npath = "/echo"\n'
    )
    process, url = await _start(config)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60  # the benchmark first: slow beside a CPU hog
            while True:
                async with session.get(url + "/health") as response:
                    state = (await response.json())["state"]
                if state == "ready":
                    break
                assert time.monotonic() < deadline, f"never ready: {state}"
                await asyncio.sleep(0.02)
            body = {"auth_data": keypair.auth_data(), "payload": {"prompt": "hi"}}
            async with session.post(url + "/echo", json=body) as response:
                assert response.status == 200
                assert await response.json() == {"received": {"prompt": "hi"}}
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    # The benchmark ran first (its first answer, then the ramp, empty payloads), then ours.
    *benchmark, ours = model_server.recorder.payloads
    assert len(benchmark) > 1 and all(payload == {} for payload in benchmark)
    assert ours == {"prompt": "hi"}


async def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[[routes]]\npath = "/echo"\nmax_queue_time = "soon"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(config),
        stderr=asyncio.subprocess.PIPE, env=_environ(),
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"routes.0.max_queue_time" in stderr


async def test_bad_environment_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[[routes]]\npath = "/echo"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(config),
        stderr=asyncio.subprocess.PIPE, env=_environ(WORKER_PORT="http"),
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2 and b"WORKER_PORT" in stderr


async def test_a_port_in_use_says_how_to_choose_another(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[model_server]\nbase_url = "http://127.0.0.1:9"\n[[routes]]\npath = "/e"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyworker", "run", str(config), "--port", port,
            stderr=asyncio.subprocess.PIPE, env=_environ(),
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    text = stderr.decode()
    assert process.returncode == 1, text
    assert f"another program listens on port {port}" in text
    assert "--port or WORKER_PORT" in text
    # A local run on loopback warns about no `docker run -p` (in a container: an INFO note).
    assert not [line for line in text.splitlines() if "WARNING" in line and "docker" in line]
    assert "Traceback" not in text


async def test_an_unknown_config_field_gets_a_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[[routes]]\npath = "/echo"\nworklaod = "max_tokens"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "run", str(config),
        stderr=asyncio.subprocess.PIPE, env=_environ(),
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "routes.0.worklaod: Extra inputs are not permitted; did you mean 'workload'?" in (
        stderr.decode()
    )


PROBE = """
import sys
from pyworker.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
tools = sorted(m for m in sys.modules if m.startswith("pyworker.devtools"))
print("TOOLS", ",".join(tools))
"""


async def _imported_tools(*argv: str) -> tuple[str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, *argv, stdout=asyncio.subprocess.PIPE, env=_environ()
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    text = output.decode()
    return text, text.rpartition("TOOLS ")[2].strip()


async def test_run_leaves_the_developer_tools_unimported() -> None:
    help_text, tools = await _imported_tools("run", "--help")
    assert "--set KEY=VALUE" in help_text
    assert tools == ""
    help_text, tools = await _imported_tools("--help")
    assert "dev" in help_text and "load" in help_text
    assert "pyworker.devtools.commands.dev" in tools.split(",")
