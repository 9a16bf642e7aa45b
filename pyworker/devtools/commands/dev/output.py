"""What `pyworker dev` prints for people: how to call the worker, a request and its answer, paths.

Every command it prints can be pasted as is: the program as the user ran it, the data quoted.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import orjson

from pyworker.devtools.commands.dev.plan import Plan
from pyworker.devtools.commands.routing import default_cost

MAX_SHOWN_ANSWER = 4000
MAX_SHOWN_PAYLOAD = 200


def how_to_call(plan: Plan, autoscaler: str, worker: str, state_dir: Path) -> str:
    """The lines shown once the worker is ready: its routes, commands to paste, where logs are."""
    command = command_name()
    data = shlex.quote(orjson.dumps(plan.example).decode())
    cost = default_cost(plan.example)
    route_body = shlex.quote(
        orjson.dumps({"endpoint": plan.endpoint, "cost": _plain(cost)}).decode()
    )
    payload_json = orjson.dumps(plan.example).decode().replace("'", "'\\''")
    routes = ", ".join(route.path for route in plan.config.routes)
    logs = ", ".join(shown(state_dir / name) for name in ("worker.log", "model.log"))
    return "\n".join(
        [
            "",
            f"Ready: endpoint {plan.endpoint!r} has 1 worker behind the local autoscaler "
            f"{autoscaler}",
            f"  routes:     {routes}",
            f"  call it:    {command} call {plan.route} --data {data}",
            f"  streamed:   {command} call {plan.route} --stream --data {data}",
            f"  load test:  {command} load -n 200 --rps 20",
            f"  with curl:  AUTH=$(curl -s -X POST {autoscaler}/route/ -d {route_body})",
            f"              curl -s -X POST {worker}{plan.route} -d "
            f'\'{{"auth_data": \'"$AUTH"\', "payload": {payload_json}}}\'',
            f"  dashboard:  {autoscaler}/",
            f"  logs:       {logs}",
            "Press Ctrl-C to stop.",
        ]
    )


def token_text(master_token: str, worker: str) -> str:
    """The MASTER_TOKEN made up for a dev run: what `/status` details and `/metrics` need."""
    return (
        f"MASTER_TOKEN for this run (made up: none was set): {master_token}\n"
        f"  details:    curl -s -H 'Authorization: Bearer {master_token}' {worker}/status"
        f"  (and /metrics)"
    )


def exchange_text(route: str, payload: Any, body: bytes) -> str:
    """A request and its answer as shown after the demo request."""
    return f"request: POST {route} {_compact(payload)}\nanswer:\n{_answer_text(body)}"


def command_name() -> str:
    """How the user ran pyworker, to print commands they can paste."""
    program = sys.argv[0] if sys.argv else ""
    if not program or program.endswith("__main__.py"):
        return f"{shown(Path(sys.executable))} -m pyworker"
    found = shutil.which("pyworker")
    if found and Path(found).resolve() == Path(program).resolve():
        return "pyworker"
    return program


def shown(path: Path) -> str:
    """A path relative to the current directory when it is inside it."""
    with contextlib.suppress(ValueError):
        return str(path.absolute().relative_to(Path.cwd()))
    return str(path)


def _plain(number: float) -> float | int:
    return int(number) if number.is_integer() else number


def _compact(payload: Any) -> str:
    text = orjson.dumps(payload).decode()
    return text if len(text) <= MAX_SHOWN_PAYLOAD else text[: MAX_SHOWN_PAYLOAD - 1] + "…"


def _answer_text(body: bytes) -> str:
    try:
        text = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", errors="replace")
    return text if len(text) <= MAX_SHOWN_ANSWER else text[:MAX_SHOWN_ANSWER] + "\n…"
