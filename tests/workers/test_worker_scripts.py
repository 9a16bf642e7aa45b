"""The ready workers' client and load scripts (pyworker/workers/<name>/) against a stand-in worker.

Each load script is `pyworker load` with its worker's route, payload preparation and work
counting; each client sends one request and prints the answer. These tests check them against
what a worker receives and answers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.workers.comfyui import client as comfyui_client
from pyworker.workers.comfyui import load as comfyui_load
from pyworker.workers.openai import client as openai_client
from pyworker.workers.openai import load as openai_load
from pyworker.workers.tgi import client as tgi_client
from pyworker.workers.tgi import load as tgi_load

REPOSITORY = Path(__file__).resolve().parents[2]


class StandIn:
    """Plays an UNSECURED worker: records each envelope, answers as the backend would."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{route:.*}", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.StreamResponse:
        envelope = await request.json()
        self.received.append((request.path, envelope))
        payload = envelope["payload"]
        if request.path == "/v1/completions":
            usage = {"completion_tokens": payload["max_tokens"]}
            if payload.get("stream"):
                return await self.sse(request, [{"choices": [{"text": "x"}]}, {"usage": usage}])
            return web.json_response({"choices": [{"text": "x"}], "usage": usage})
        if request.path == "/v1/chat/completions":
            usage = {"prompt_tokens": 3, "completion_tokens": 2}
            deltas = [{"choices": [{"delta": {"content": part}}]} for part in ("Hel", "lo")]
            return await self.sse(request, [*deltas, {"choices": [], "usage": usage}])
        if request.path == "/generate_stream":
            events: list[dict[str, Any]] = [
                {"token": {"text": "x"}},
                {"token": {"text": "y"}, "details": {"generated_tokens": 7}},
            ]
            return await self.sse(request, events)
        if request.path == "/generate":
            return web.json_response({"generated_text": "xy", "details": {"generated_tokens": 7}})
        if request.path == "/workflow":
            images = [
                {"filename": name, "base64": base64.b64encode(name.encode()).decode()}
                for name in ("a.png", "b.png")
            ]
            return web.json_response({"prompt_id": "p1", "seconds": 1.5, "images": images})
        return web.json_response({"error": "no such route"}, status=404)

    @staticmethod
    async def sse(request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def stand_in() -> AsyncIterator[tuple[StandIn, str]]:
    worker = StandIn()
    server = TestServer(worker.app(), host="127.0.0.1")
    await server.start_server()
    yield worker, str(server.make_url("")).rstrip("/")
    await server.close()


async def run_script(
    main: Callable[[Sequence[str]], int], capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, dict[str, Any]]:
    """Run a load script as its command line would (its own event loop, in a thread)."""
    status = await asyncio.to_thread(main, [*argv, "--requests", "6", "-c", "3", "--json"])
    return status, orjson.loads(capsys.readouterr().out)


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_counts_the_completion_tokens_of_usage(
    stand_in: tuple[StandIn, str], capsys: pytest.CaptureFixture[str], stream: bool
) -> None:
    worker, url = stand_in
    flags = ["--stream"] if stream else []
    status, summary = await run_script(openai_load.main, capsys, "--worker", url, *flags)
    assert status == 0 and summary["ok"] == 6
    payloads = [envelope["payload"] for _, envelope in worker.received]
    assert {path for path, _ in worker.received} == {"/v1/completions"}
    assert summary["workload"] == sum(payload["max_tokens"] for payload in payloads)
    for _, envelope in worker.received:
        auth_data, payload = envelope["auth_data"], envelope["payload"]
        assert auth_data["url"] == url and auth_data["cost"] == openai_load.cost_of(payload)
        assert payload.get("stream", False) is stream
        assert ("stream_options" in payload) is stream
    if stream:
        assert summary["first_byte"]["p50"] is not None


@pytest.mark.parametrize(("stream", "route"), [(False, "/generate"), (True, "/generate_stream")])
async def test_tgi_counts_generated_tokens_and_asks_for_details(
    stand_in: tuple[StandIn, str], capsys: pytest.CaptureFixture[str], stream: bool, route: str
) -> None:
    worker, url = stand_in
    flags = ["--stream"] if stream else []
    status, summary = await run_script(tgi_load.main, capsys, "--worker", url, *flags)
    assert status == 0 and summary["ok"] == 6
    assert summary["workload"] == 6 * 7
    for path, envelope in worker.received:
        parameters = envelope["payload"]["parameters"]
        assert path == route
        assert parameters["details"] is True and "decoder_input_details" not in parameters


async def test_comfyui_reseeds_every_workflow_and_counts_images(
    stand_in: tuple[StandIn, str], capsys: pytest.CaptureFixture[str]
) -> None:
    worker, url = stand_in
    status, summary = await run_script(comfyui_load.main, capsys, "--worker", url)
    assert status == 0 and summary["ok"] == 6
    assert summary["workload"] == 6 * 2  # two images an answer
    seeds = set()
    for path, envelope in worker.received:
        workflow = envelope["payload"]["workflow"]
        assert path == "/workflow"
        assert envelope["auth_data"]["cost"] == comfyui_load.workflow_cost(envelope["payload"])
        seeds |= {node["inputs"]["seed"] for node in workflow.values() if "seed" in node["inputs"]}
    assert len(seeds) == 6  # a fresh seed each time: ComfyUI cannot answer from its cache


async def test_a_worker_that_fails_makes_the_script_fail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with_nobody = "http://127.0.0.1:9"  # discard port: nothing listens
    status, summary = await run_script(openai_load.main, capsys, "--worker", with_nobody)
    assert status == 1
    assert summary["failed"] == 6 and summary["status_counts"] == {"connection": 6}


def test_bad_flags_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert tgi_load.main(["--worker", "http://127.0.0.1:9", "--requests", "0"]) == 2
    assert "--requests must be between" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tgi_load.main(["--requests", "5"])  # neither --autoscaler nor --worker


# --- the clients ---------------------------------------------------------------------------
async def run_client(
    main: Callable[[Sequence[str]], int], capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    status = await asyncio.to_thread(main, list(argv))
    return status, capsys.readouterr().out


async def test_the_openai_client_streams_a_chat_answer(
    stand_in: tuple[StandIn, str], capsys: pytest.CaptureFixture[str]
) -> None:
    worker, url = stand_in
    status, output = await run_client(openai_client.main, capsys, "--worker", url, "Hi there")
    assert status == 0
    assert output == "Hello\n[3 + 2 tokens]\n\n"
    ((path, envelope),) = worker.received
    payload = envelope["payload"]
    assert path == "/v1/chat/completions"
    assert payload["messages"] == [{"role": "user", "content": "Hi there"}]
    assert payload["stream"] is True
    assert envelope["auth_data"]["cost"] == openai_client.estimated_cost(payload)


@pytest.mark.parametrize(
    ("flags", "route", "printed"),
    [
        ([], "/generate_stream", "xy\n[7 tokens]\n"),
        (["--no-stream"], "/generate", "xy\n[7 tokens]\n"),
    ],
)
async def test_the_tgi_client_prints_the_generated_text(
    stand_in: tuple[StandIn, str],
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    route: str,
    printed: str,
) -> None:
    worker, url = stand_in
    status, output = await run_client(tgi_client.main, capsys, "--worker", url, *flags, "Hi")
    assert status == 0 and output == printed
    ((path, envelope),) = worker.received
    assert path == route and envelope["payload"]["inputs"] == "Hi"


async def test_the_comfyui_client_saves_the_images(
    stand_in: tuple[StandIn, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    worker, url = stand_in
    out = tmp_path / "images"
    status, output = await run_client(
        comfyui_client.main, capsys, "--worker", url, "--prompt", "a fox", "--out", str(out)
    )
    assert status == 0
    assert (out / "a.png").read_bytes() == b"a.png" and (out / "b.png").read_bytes() == b"b.png"
    assert output.splitlines()[-1] == "[prompt p1 in 1.5 s]"
    ((path, envelope),) = worker.received
    assert path == "/workflow" and "a fox" in json.dumps(envelope["payload"]["workflow"])


async def test_a_client_without_a_worker_fails_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = await asyncio.to_thread(tgi_client.main, ["--worker", "http://127.0.0.1:9", "Hi"])
    assert status == 1
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize(
    "command",
    [
        ["workers/hello_world/client.py"],
        ["workers/openai/client.py"],
        ["workers/tgi/client.py"],
        ["workers/comfyui/client.py"],
        ["-m", "workers.openai.load"],
        ["-m", "workers.tgi.load"],
        ["-m", "workers.comfyui.load"],
    ],
)
def test_the_scripts_run_from_a_clone_as_the_readmes_say(command: list[str]) -> None:
    """The root workers/<name>/ scripts are the package's, run by their old paths."""
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
