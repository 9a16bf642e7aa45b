"""Each wire message has one definition: what the worker sends is what the autoscaler accepts."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from pyworker import __version__
from pyworker.config.environment import Environment
from pyworker.devtools.local.autoscaler import LocalAutoscaler
from pyworker.devtools.local.fleet import WorkerPhase
from pyworker.devtools.local.messages import DELETE_REQUESTS, ROUTE_REQUEST, WORKER_REPORT
from pyworker.lifecycle.accounting import Interval, Ledger
from pyworker.lifecycle.reporter import Reporter
from pyworker.lifecycle.state import WorkerState, WorkerStatus
from pyworker.protocol import messages
from pyworker.protocol.messages import DeleteRequests, FinishedItem, RouteRequest
from tests.support.states import advance

MESSAGES = Path(messages.__file__)
ENVIRON = {
    "CONTAINER_ID": "42",
    "MASTER_TOKEN": "secret-token",
    "REPORT_ADDR": "http://127.0.0.1:9",
    "PUBLIC_IPADDR": "127.0.0.9",
    "WORKER_PORT": "3000",
    "VAST_TCP_PORT_3000": "41234",
    "USE_SSL": "true",
}
URL = "https://127.0.0.9:41234"


def reporter_message(error_msg: str) -> dict[str, Any]:
    """The JSON the worker's reporter sends for an errored worker with no load, as received."""
    environment = Environment.from_env(ENVIRON)
    status = WorkerStatus()
    advance(status, WorkerState.ERRORED, error_msg)
    reporter = Reporter(environment, status, Ledger(), lambda: environment.public_url())
    report: dict[str, Any] = orjson.loads(
        orjson.dumps(reporter.build_status(Interval(), 0).to_wire())
    )
    return report


def test_the_start_report_is_the_reporters_message_for_the_same_values() -> None:
    sent = reporter_message("model weights missing")
    start = json.loads(
        json.dumps(messages.start_report("model weights missing", ENVIRON).to_wire())
    )

    assert list(start) == list(sent)  # the same keys, in the same order
    assert sent.pop("version") == __version__ and start.pop("version") == ""
    assert start == sent
    assert start["url"] == URL and start["id"] == 42 and start["mtoken"] == "secret-token"


def test_without_public_ipaddr_only_a_running_worker_names_a_url() -> None:
    """One url format (messages.public_url); only a running worker has an address to fall
    back on: where it listens, loopback for any address."""
    environ = {name: value for name, value in ENVIRON.items() if name != "PUBLIC_IPADDR"}
    assert messages.start_report("no GPU", environ).url == ""
    assert Environment.from_env(environ).public_url() == "https://127.0.0.1:41234"
    assert Environment.from_env(ENVIRON).public_url() == URL


def test_what_the_worker_sends_the_local_autoscaler_accepts_as_sent() -> None:
    sent = reporter_message("")
    received = WORKER_REPORT.validate_python(sent)
    assert received.to_wire() == sent

    items = [FinishedItem(7, True, "Success", 1.0, 2.0, 3.0), FinishedItem(8, False, "Error")]
    finished = DeleteRequests(42, "secret-token", requests=items).to_wire()
    assert set(finished) == {"worker_id", "mtoken", "requests"}
    assert DELETE_REQUESTS.validate_python(orjson.loads(orjson.dumps(finished))).to_wire() == (
        finished
    )
    older = DeleteRequests(42, "", request_idxs=[1, 2], success=False).to_wire()
    assert set(older) == {"worker_id", "mtoken", "request_idxs", "success"}
    assert DELETE_REQUESTS.validate_python(older).to_wire() == older


def test_the_definitions_refuse_what_the_protocol_does_not_allow() -> None:
    with pytest.raises(ValueError, match="requests or request_idxs"):
        DeleteRequests(1)
    with pytest.raises(ValueError, match="cost"):
        RouteRequest("demo", cost=-1.0)
    assert ROUTE_REQUEST.validate_python({"endpoint": "demo", "cost": "2"}).cost == 2.0


async def test_the_start_report_from_a_bare_python_reaches_the_local_autoscaler() -> None:
    """Run by file path, as scripts/on_start.sh does: no pyworker import, no site-packages."""
    async with LocalAutoscaler(master_token="secret-token") as autoscaler:
        environ = {"PATH": os.environ.get("PATH", "")} | ENVIRON
        environ["REPORT_ADDR"] = f"{autoscaler.url}, http://127.0.0.1:9"  # one is down
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", str(MESSAGES), 'no "GPU"\n\udcff', env=environ
        )
        assert await asyncio.wait_for(process.wait(), 30) == 0

        report = autoscaler.reports[42]  # as received, less its token
        expected = reporter_message(report["error_msg"]) | {"version": ""}
        assert expected.pop("mtoken") == "secret-token" and report == expected
        assert report["error_msg"] == 'no "GPU"\n\ufffd'
        assert autoscaler.fleet.phase(autoscaler.fleet.workers[42]) is WorkerPhase.ERRORED


def test_the_message_module_runs_on_any_python3_without_pyworker() -> None:
    """The start script may run it with an old python3, before pyworker is installed."""
    tree = ast.parse(MESSAGES.read_text(), feature_version=(3, 7))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert imported <= sys.stdlib_module_names | {"__future__"}
