"""`pyworker call` and `pyworker load` as real processes, routed by a running `pyworker dev`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from pyworker.devtools.commands.dev.state import (
    DEFAULT_AUTOSCALER,
    STATE_FILE,
    DevState,
    find_state,
    read_state,
    remove_state,
    write_state,
)
from pyworker.devtools.commands.load import (
    LoadReport,
    Outcome,
    choose_payloads,
    format_summary,
    percentile,
    produced_work,
)
from pyworker.devtools.commands.routing import (
    DataError,
    NoAutoscaler,
    Target,
    default_cost,
    parse_data,
)
from pyworker.devtools.local.autoscaler import LocalAutoscaler

TOKENS_PER_SECOND = 50  # slow enough to see a stream arrive in pieces
REPOSITORY = Path(__file__).resolve().parents[2]
DATASET = REPOSITORY / "pyworker" / "workers" / "hello_world" / "benchmark.jsonl"
CLIENT = REPOSITORY / "workers" / "hello_world" / "client.py"


def _environ(runtime: Path | None) -> dict[str, str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REPORT_ADDR", "CONTAINER_ID", "XDG_RUNTIME_DIR")
    }
    if runtime is not None:
        environ["XDG_RUNTIME_DIR"] = str(runtime)
    return environ


@dataclass
class DevRun:
    folder: Path
    runtime: Path
    state: DevState

    def pyworker(
        self, *arguments: str, cwd: Path | None = None, runtime: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyworker", *arguments],
            cwd=cwd or self.folder,
            env=_environ(self.runtime if runtime else None),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevRun]:
    """One `pyworker dev` for the module; the benchmark is skipped (`perf`) to start fast."""
    folder = tmp_path_factory.mktemp("dev")
    runtime = folder / "runtime"
    command = [
        sys.executable, "-m", "pyworker", "dev",
        "--demo-load-seconds", "0.2",
        "--demo-tokens-per-second", str(TOKENS_PER_SECOND),
        "--set", "perf=500",
    ]  # fmt: skip
    with (folder / "dev.out").open("wb") as output:
        process = subprocess.Popen(
            command, cwd=folder, env=_environ(runtime), stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        state = None
        while state is None or not state.ready:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((folder / "dev.out").read_text())
            time.sleep(0.05)
            state = read_state(folder / ".pyworker" / STATE_FILE)
        yield DevRun(folder, runtime, state)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    assert not any(psutil.pid_exists(pid) for pid in state.children.values())


async def _pyworker(*arguments: str) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop (an autoscaler may be served by this test)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", *arguments,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_environ(None),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- call -----------------------------------------------------------------------------------------


def test_call_prints_the_answer_of_the_worker_the_dev_autoscaler_chose(dev: DevRun) -> None:
    payload = '{"prompt": "hello there", "max_tokens": 7}'
    result = dev.pyworker("call", "/v1/completions", "--data", payload, "-v")
    assert result.returncode == 0, result.stderr
    answer = orjson.loads(result.stdout)
    assert answer["object"] == "text_completion"
    assert answer["usage"]["completion_tokens"] == 7
    assert f"to {dev.state.worker_url} (request_idx" in result.stderr
    assert "HTTP 200" in result.stderr


def test_call_finds_the_session_through_the_runtime_dir(dev: DevRun, tmp_path: Path) -> None:
    data = tmp_path / "payload.json"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}')
    result = dev.pyworker(
        "call", "/v1/chat/completions", "--data", f"@{data}", cwd=tmp_path, runtime=True
    )
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["usage"]["completion_tokens"] == 3


async def test_call_stream_prints_chunks_as_they_arrive(dev: DevRun) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "call", "/v1/completions", "--stream",
        "--data", '{"prompt": "stream me", "max_tokens": 50}',
        stdout=asyncio.subprocess.PIPE, cwd=dev.folder, env=_environ(None),
    )  # fmt: skip
    assert process.stdout is not None
    arrivals: list[tuple[float, bytes]] = []
    while line := await asyncio.wait_for(process.stdout.readline(), 30):
        if line.strip():
            arrivals.append((time.monotonic(), line.strip()))
    assert await process.wait() == 0
    events = [line for _, line in arrivals]
    assert events[-1] == b"data: [DONE]"
    texts = [orjson.loads(line[6:])["choices"][0]["text"] for line in events[:-1]]
    assert len("".join(texts).split()) == 50
    # 50 tokens at 50 per second take 1 s: the first was shown well before the last. (A loaded
    # machine can stall the printing process and have it show what came meanwhile at once: 10
    # tokens in 0.2 s arrived within 0.09 s beside a CPU hog; not most of a second.)
    assert arrivals[-1][0] - arrivals[0][0] > 0.4


def test_call_stream_into_a_reader_that_goes_away_exits_quietly(dev: DevRun) -> None:
    """`pyworker call --stream | head -1`: no BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pyworker", "call", "/v1/completions", "--stream",
         "--data", '{"prompt": "stream me", "max_tokens": 100}'],
        cwd=dev.folder, env=_environ(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().startswith(b"data: ")  # 100 tokens at 50/s: 2 s to go
    process.stdout.close()  # what `head -1` does after its line
    errors = process.stderr.read().decode()
    assert process.wait(30) == 141, errors  # a shell's status for SIGPIPE
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors


def test_call_of_a_route_the_worker_lacks_names_its_routes(dev: DevRun) -> None:
    result = dev.pyworker("call", "/v1/nothing", "--data", "{}")
    assert result.returncode == 1
    assert (
        "the worker has no route /v1/nothing; its routes: /v1/completions, /v1/chat/completions"
        in result.stderr
    ), result.stderr
    assert "HTTP 404" in result.stderr


def test_call_without_a_dev_session_says_so_and_sends_nothing(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    client = str(CLIENT)
    for command in (
        ["-m", "pyworker", "call", "/v1/completions"],
        ["-m", "pyworker", "load", "-n", "1", "--data", "{}"],
        [client, "hello"],  # the hello_world worker's client
    ):
        result = subprocess.run(
            [sys.executable, *command],
            cwd=tmp_path, env=_environ(runtime), capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "no `pyworker dev` is running" in result.stderr
        assert str(tmp_path / ".pyworker" / STATE_FILE) in result.stderr
        assert "start `pyworker dev`" in result.stderr and "--autoscaler URL" in result.stderr
        assert result.stdout == ""


def test_call_passes_the_model_servers_refusal_through(dev: DevRun) -> None:
    result = dev.pyworker("call", "/v1/completions", "--data", '{"prompt": 5}')
    assert result.returncode == 1
    assert orjson.loads(result.stdout)["error"]["param"] == "prompt"
    assert "HTTP 400" in result.stderr


def test_call_for_an_unknown_endpoint_says_so(dev: DevRun) -> None:
    result = dev.pyworker("call", "/v1/completions", "--endpoint", "other")
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr
    assert "unknown endpoint 'other': this autoscaler serves 'hello_world'" in result.stderr


def test_call_to_a_wrong_autoscaler_names_the_running_one(dev: DevRun, refused_port: int) -> None:
    wrong = f"http://127.0.0.1:{refused_port}"
    result = dev.pyworker("call", "/v1/completions", "--autoscaler", wrong)
    assert result.returncode == 1
    assert f"cannot reach the autoscaler at {wrong}" in result.stderr
    assert (
        f"the running `pyworker dev`'s autoscaler is {dev.state.autoscaler}: leave out "
        f"--autoscaler, or pass --autoscaler {dev.state.autoscaler}" in result.stderr
    ), result.stderr


def test_call_refuses_data_that_is_not_json(dev: DevRun) -> None:
    result = dev.pyworker("call", "/v1/completions", "--data", "{nope")
    assert result.returncode == 2 and "not valid JSON" in result.stderr


async def test_call_gives_up_when_no_worker_becomes_ready() -> None:
    async with LocalAutoscaler() as autoscaler:
        # No wall-clock bound here: starting a Python process on a loaded machine takes seconds.
        # The message says the 0.5 s deadline ended the wait; _pyworker fails a call that hangs.
        code, out, err = await _pyworker(
            "call", "/v1/completions", "--autoscaler", autoscaler.url, "--wait", "0.5"
        )
    assert code == 1 and out == ""
    assert "no worker ready after 0.5 s" in err and "0 ready" in err
    assert autoscaler.fleet.workers == {}


async def test_call_reports_an_autoscaler_that_is_not_there(refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}"
    code, _, err = await _pyworker("call", "/v1/completions", "--autoscaler", url)
    assert code == 1 and f"cannot reach the autoscaler at {url}" in err
    assert "no `pyworker dev` runs here: start one, or pass the --autoscaler URL" in err


# -- load -----------------------------------------------------------------------------------------


def test_load_summarises_throughput_latency_statuses_and_workload(dev: DevRun) -> None:
    result = dev.pyworker(
        "load", "/v1/completions", "-n", "20", "--rps", "40", "--concurrency", "4", "--json",
        "--data", '{"prompt": "load", "max_tokens": 3}',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = orjson.loads(result.stdout)
    assert summary["requests"] == 20 and summary["ok"] == 20 and summary["failed"] == 0
    assert summary["status_counts"] == {"200": 20}
    assert summary["workload"] == 60  # completion tokens from each answer's usage
    latency = summary["latency"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert latency["p50"] >= 3 / TOKENS_PER_SECOND * 0.9
    assert 0 < summary["throughput"] <= 40 * 1.5
    assert summary["workload_per_second"] == pytest.approx(60 / summary["seconds"], rel=0.01)
    assert "20/20" in result.stderr  # the progress bar


def test_load_defaults_to_the_dev_route_and_dataset(dev: DevRun) -> None:
    payloads = [orjson.loads(line) for line in DATASET.read_text().splitlines()]
    result = dev.pyworker("load", "-n", str(len(payloads)), "--rps", "200", "--json")
    assert result.returncode == 0, result.stderr
    summary = orjson.loads(result.stdout)
    assert summary["ok"] == len(payloads)
    assert summary["workload"] == sum(payload["max_tokens"] for payload in payloads)


def test_load_counts_failures_by_status(dev: DevRun) -> None:
    result = dev.pyworker("load", "-n", "4", "--rps", "100", "--data", '{"prompt": 5}')
    assert result.returncode == 1
    assert "status:     400 x4" in result.stdout
    assert "4 failed" in result.stdout and "no successful request" in result.stdout


async def test_load_counts_requests_that_were_never_routed() -> None:
    async with LocalAutoscaler() as autoscaler:
        code, out, _ = await _pyworker(
            "load", "-n", "3", "--rps", "100", "--json", "--autoscaler", autoscaler.url,
            "--wait", "0.2", "--data", "{}",
        )  # fmt: skip
    assert code == 1
    summary = orjson.loads(out)
    assert summary["status_counts"] == {"routing": 3}
    assert summary["reasons"]["routing"].startswith("no worker ready after 0.2 s")


async def test_load_says_why_requests_were_not_routed(refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}"
    code, out, _ = await _pyworker(
        "load", "-n", "3", "--rps", "100", "--autoscaler", url, "--data", "{}"
    )
    assert code == 1
    assert "status:     routing x3" in out
    assert f"why routing: cannot reach the autoscaler at {url}" in out


def test_load_rejects_a_rate_of_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyworker", "load", "--rps", "0"],
        capture_output=True, text=True, timeout=60, check=False, env=_environ(None),
    )  # fmt: skip
    assert result.returncode == 2 and "--rps" in result.stderr


def test_load_needs_a_payload_when_no_session_runs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass --data or --dataset"):
        choose_payloads(None, None, None)
    state = DevState(pid=1, autoscaler="http://x", endpoint="e", example={"prompt": "p"})
    assert choose_payloads(None, None, state) == [{"prompt": "p"}]
    assert choose_payloads('{"a": 1}', None, state) == [{"a": 1}]
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"n": 1}\n{"n": 2}\n')
    assert choose_payloads(None, str(dataset), state) == [{"n": 1}, {"n": 2}]
    with pytest.raises(DataError, match="not a file"):
        choose_payloads(None, str(tmp_path / "missing.jsonl"), None)


# -- the pieces -----------------------------------------------------------------------------------


def test_percentile_interpolates_between_neighbours() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile(list(map(float, range(101))), 90) == 90.0


def test_summary_counts_only_successes_in_latency_and_workload() -> None:
    report = LoadReport(target_rps=10, elapsed=2.0)
    report.outcomes = [Outcome("200", 0.1, 5), Outcome("200", 0.3, 7), Outcome("429", 0.01, 9)]
    report.outcomes.append(Outcome("timeout", 9.0, 0))
    summary = report.summary()
    assert summary["ok"] == 2 and summary["failed"] == 2
    assert summary["latency"]["max"] == 0.3 and summary["latency"]["p50"] == pytest.approx(0.2)
    assert summary["workload"] == 12 and summary["workload_per_second"] == 6
    assert summary["status_counts"] == {"200": 2, "429": 1, "timeout": 1}
    text = format_summary(summary)
    assert "4 sent, 2 ok, 2 failed" in text and "200 x2, 429 x1, timeout x1" in text


def test_produced_work_reads_usage_of_plain_and_streamed_answers() -> None:
    assert produced_work(b'{"usage": {"completion_tokens": 4}}', "application/json", 9) == 4
    stream = b'data: {"usage": null}\n\ndata: {"usage": {"completion_tokens": 6}}\n\ndata: [DONE]'
    assert produced_work(stream, "text/event-stream", 9) == 6
    assert produced_work(b"not json", "text/plain", 9) == 9


def test_cost_defaults_to_max_tokens() -> None:
    assert default_cost({"max_tokens": 12}) == 12
    assert default_cost({"max_tokens": True}) == 100
    assert default_cost({"prompt": "x"}) == 100
    assert default_cost([1, 2]) == 100


def test_flags_win_over_the_session_which_wins_over_defaults() -> None:
    state = DevState(pid=1, autoscaler="http://127.0.0.1:5/", endpoint="mine")
    assert Target.resolve(None, None, None, state) == Target("http://127.0.0.1:5", "mine")
    assert Target.resolve("http://h:1", "e", "k", state) == Target("http://h:1", "e", "k")
    with pytest.raises(NoAutoscaler, match="no `pyworker dev` is running"):
        Target.resolve(None, None, None, None)  # no quiet default: it may be another service
    assert Target.resolve(DEFAULT_AUTOSCALER, None, None, None).endpoint == "hello_world"


def test_data_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"a": [1]}')
    assert parse_data(f"@{tmp_path / 'p.json'}") == {"a": [1]}
    with pytest.raises(DataError, match="No such file"):
        parse_data(f"@{tmp_path / 'missing.json'}")


def test_state_of_a_session_that_is_gone_is_ignored(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    paths = [tmp_path / "a" / STATE_FILE, tmp_path / "b" / STATE_FILE]
    write_state(DevState(pid=ended.pid, autoscaler="http://127.0.0.1:1", endpoint="x"), paths)
    assert all(path.exists() for path in paths)
    assert find_state(paths) is None

    live = DevState(pid=os.getpid(), autoscaler="http://127.0.0.1:2", endpoint="y", ready=True)
    write_state(live, paths[1:])
    assert find_state(paths) == live
    remove_state(paths, pid=12345678)  # another session's files are left alone
    assert paths[1].exists()
    remove_state(paths, pid=os.getpid())
    assert not paths[1].exists() and paths[0].exists()


def test_state_file_tolerates_garbage(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    for content in (b"", b"[]", b'{"pid": "1"}', b"\xff"):
        path.write_bytes(content)
        assert read_state(path) is None
    document: dict[str, Any] = {"pid": os.getpid(), "autoscaler": "http://x", "children": [1]}
    path.write_bytes(orjson.dumps(document))
    state = read_state(path)
    assert state is not None and state.children == {} and state.endpoint == "hello_world"


def test_the_dev_worker_verifies_strictly_and_refuses_a_replay(dev: DevRun) -> None:
    def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    status, auth_data = post(dev.state.autoscaler + "/route/", {"endpoint": dev.state.endpoint})
    assert status == 200 and "strict_signature" in auth_data
    payload = {"prompt": "once", "max_tokens": 2}
    envelope = {"auth_data": auth_data, "payload": payload}
    first, _ = post(dev.state.worker_url + "/v1/completions", envelope)
    replayed, answer = post(dev.state.worker_url + "/v1/completions", envelope)
    assert first == 200
    assert replayed == 401, answer


def test_the_dev_state_keeps_the_worker_token_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "dev.json"
    write_state(DevState(1, "http://127.0.0.1:1", "hello_world", master_token="secret"), [path])
    assert path.stat().st_mode & 0o777 == 0o600
    state = DevState.from_document(orjson.loads(path.read_bytes()))
    assert state is not None and state.master_token == "secret"
