"""docs/template-repository.md's "Try it locally", run as written: the template's own worker.py
(`python3 -m worker` with Vast's variables) in front of the demo model server, reporting to the
local autoscaler, and a request routed and signed by it answered by the worker.

Only the ports change (free ones instead of 8081, 18000 and 3000, so that tests can run side by
side); the commands are the document's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "template-repository.md"
DOCUMENTED_PORTS = ("18000", "8081", "3000")


def section(title: str) -> str:
    text = DOCUMENT.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def free_ports(count: int) -> list[str]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for each in sockets:
            each.bind(("127.0.0.1", 0))
        return [str(each.getsockname()[1]) for each in sockets]
    finally:
        for each in sockets:
            each.close()


def with_ports(text: str, ports: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(ports) + r")\b", lambda match: ports[match.group(1)], text)


def environ() -> dict[str, str]:
    """The test's venv first on PATH (the document's `python3` with pyworker installed), and
    none of the variables the commands set themselves."""
    cleared = ("CONTAINER_ID", "REPORT_ADDR", "MASTER_TOKEN", "MODEL_LOG", "MODEL_SERVER_URL")
    variables = {
        name: value
        for name, value in os.environ.items()
        if name not in cleared and not name.startswith(("WORKER_", "VAST_TCP_PORT_", "PYWORKER_"))
    }
    variables["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), variables["PATH"]])
    return variables


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Whatever the commands left in their process group: SIGTERM, then SIGKILL at 20 s."""
    deadline = time.monotonic() + 20
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)  # raises once every process of the group is gone
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the document's commands use curl")
def test_the_documented_commands_route_a_signed_request_to_the_templates_worker(
    tmp_path: Path,
) -> None:
    try_it = section("Try it locally")
    setup, commands = blocks(try_it, "bash")
    assert "pip install -r requirements.txt" in setup  # tests/startup/test_start_path.py
    (worker_py,) = blocks(section("Option 2: a template repository"), "python")
    ports = dict(zip(DOCUMENTED_PORTS, free_ports(3), strict=True))
    (tmp_path / "worker.py").write_text(with_ports(worker_py, ports))
    script = tmp_path / "try.sh"
    script.write_text(with_ports(commands, ports))

    process = subprocess.Popen(
        ["bash", "-eu", str(script)], cwd=tmp_path, env=environ(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        stop_group(process)
    text = output.decode()
    assert process.returncode == 0, text
    answer = json.loads(text.strip().splitlines()[-1])
    assert answer["object"] == "text_completion", text
    assert answer["usage"]["completion_tokens"] == 16
    log = (tmp_path / "worker.log").read_text()
    assert "-> ready" in log and "Traceback" not in log, log
    # The worker drained and exited on the document's last command.
    assert "worker state ready -> draining" in log
