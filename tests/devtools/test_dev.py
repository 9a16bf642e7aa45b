"""`pyworker dev` as a real process: the autoscaler, the demo model server and the worker on
free loopback ports, one routed request answered, and nothing left running afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from pyworker.config.loader import load_config
from pyworker.devtools.commands.children import Children
from pyworker.devtools.commands.dev.plan import DevOptions
from pyworker.devtools.commands.dev.session import DevSession
from pyworker.devtools.commands.dev.state import STATE_FILE, read_state
from pyworker.devtools.commands.progress import ProgressBar, Spinner
from pyworker.devtools.demo.model_server import LOADED_LINE

FAST_DEMO = ("--demo-load-seconds", "0.3", "--demo-tokens-per-second", "0")


def _environ(tmp_path: Path) -> dict[str, str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if key
        not in ("REPORT_ADDR", "CONTAINER_ID", "MODEL_SERVER_URL", "MODEL_LOG", "MASTER_TOKEN")
    }
    environ["XDG_RUNTIME_DIR"] = str(tmp_path / "runtime")
    return environ


async def _start_dev(tmp_path: Path, *arguments: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyworker", "dev", *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env=_environ(tmp_path),
    )  # fmt: skip


async def _record_descendants(pid: int, seen: dict[int, set[str]]) -> None:
    """Every process below `pid`, with every command line it had, until cancelled.

    A child first seen between its fork and its exec still shows its parent's command line:
    each poll records the command line again, so the one after the exec is kept too.
    """
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        while True:
            for child in parent.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    seen.setdefault(child.pid, set()).add(" ".join(child.cmdline()))
            await asyncio.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _assert_all_gone(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            left = [pid for pid in pids if _running(pid)]
            raise AssertionError(f"processes left behind: {left}")
        await asyncio.sleep(0.05)


async def test_dev_once_answers_a_routed_request_and_leaves_no_process(tmp_path: Path) -> None:
    process = await _start_dev(tmp_path, "--once", *FAST_DEMO)
    seen: dict[int, set[str]] = {}
    recorder = asyncio.create_task(_record_descendants(process.pid, seen))
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        recorder.cancel()
    text = output.decode()
    assert process.returncode == 0, text
    for step in ("local autoscaler on http://127.0.0.1:", "demo model server on", "model loaded",
                 "benchmark done", "worker ready", "answered HTTP 200"):  # fmt: skip
        assert step in text, (step, text)
    # The answer to the first payload of the benchmark dataset, printed on screen.
    assert '"completion_tokens": 24' in text and '"text_completion"' in text
    assert "stopped every process started" in text
    assert "MASTER_TOKEN for this run (made up: none was set)" in text

    commands = [command for lines in seen.values() for command in lines]
    assert any("pyworker.devtools.demo.model_server" in command for command in commands), commands
    assert any("pyworker run hello_world" in command for command in commands), commands
    await _assert_all_gone(list(seen))

    state_dir = tmp_path / ".pyworker"
    assert not (state_dir / STATE_FILE).exists()
    assert not (tmp_path / "runtime" / "pyworker" / STATE_FILE).exists()
    assert LOADED_LINE in (state_dir / "model.log").read_text()
    assert "listening on" in (state_dir / "worker.log").read_text()
    assert (state_dir / "cache" / "benchmark.json").exists()
    assert not (tmp_path / ".has_benchmark").exists()  # kept in the state dir


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
async def test_ctrl_c_or_a_closed_terminal_stops_the_worker_and_the_model_server(
    tmp_path: Path, signum: signal.Signals
) -> None:
    process = await _start_dev(tmp_path, *FAST_DEMO)
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while not lines or "Press Ctrl-C to stop." not in lines[-1]:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "".join(lines)
            lines.append(line.decode())
        state = read_state(tmp_path / ".pyworker" / STATE_FILE)
        assert state is not None and state.ready and state.pid == process.pid
        assert read_state(tmp_path / "runtime" / "pyworker" / STATE_FILE) == state
        children = list(state.children.values())
        assert len(children) == 2 and all(_running(pid) for pid in children)
        # Each child leads its own process group, so a terminal's Ctrl-C reaches dev only.
        assert all(os.getpgid(pid) == pid for pid in children)
        # The MASTER_TOKEN made up for the run is printed, and opens /metrics.
        (token,) = [
            line.rsplit(": ", 1)[1].strip() for line in lines if "MASTER_TOKEN for this run" in line
        ]
        async with aiohttp.ClientSession() as client:
            async with client.get(state.worker_url + "/metrics") as response:
                assert response.status in (401, 403)
            bearer = {"Authorization": f"Bearer {token}"}
            async with client.get(state.worker_url + "/metrics", headers=bearer) as response:
                assert response.status == 200

        process.send_signal(signum)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:  # a failed check: stop dev so that it stops its children
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except asyncio.TimeoutError:
                process.kill()
    assert process.returncode == 0, rest.decode()
    assert "stopped every process started" in rest.decode()
    await _assert_all_gone(children)
    assert not (tmp_path / ".pyworker" / STATE_FILE).exists()


async def test_a_model_server_that_dies_is_reported_and_everything_stops(tmp_path: Path) -> None:
    command = f"{sys.executable} -c 'import sys; print(\"no GPU here\"); sys.exit(3)'"
    process = await _start_dev(
        tmp_path,
        "--model-command", command,
        "--model-url", "http://127.0.0.1:1",  # nothing listens: the worker waits for the log
    )  # fmt: skip
    seen: dict[int, set[str]] = {}
    recorder = asyncio.create_task(_record_descendants(process.pid, seen))
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        recorder.cancel()
    text = output.decode()
    assert process.returncode == 1, text
    assert "the model server exited with status 3" in text
    assert (tmp_path / ".pyworker" / "model.log").read_text() == "no GPU here\n"
    await _assert_all_gone(list(seen))


async def test_an_unknown_worker_exits_2_before_starting_anything(tmp_path: Path) -> None:
    process = await _start_dev(tmp_path, "no_such_worker", "--once")
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"no_such_worker" in output and b"not found" in output


async def test_a_misspelt_worker_gets_the_dev_command_to_paste(tmp_path: Path) -> None:
    process = await _start_dev(tmp_path, "hello_wrold", "--once")
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    text = output.decode()
    assert process.returncode == 2, text
    assert "did you mean 'hello_world'?  pyworker dev hello_world" in text
    assert "pyworker run" not in text


async def test_a_second_session_in_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    state_dir = tmp_path / ".pyworker"
    state_dir.mkdir()
    # The state of a live session: this test process stands in for it.
    document = {"pid": os.getpid(), "autoscaler": "http://127.0.0.1:1", "endpoint": "x"}
    (state_dir / STATE_FILE).write_bytes(orjson.dumps(document))
    process = await _start_dev(tmp_path, "--once")
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert f"another `pyworker dev` (pid {os.getpid()})".encode() in output


async def test_stopping_a_child_kills_its_group_when_sigterm_is_ignored(tmp_path: Path) -> None:
    """SIGTERM, a bounded wait, then SIGKILL for the child and the grandchild it started."""
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print('grandchild', grandchild.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    children = Children()
    child = await children.start(
        "stubborn", [sys.executable, "-c", script], os.environ, tmp_path / "out.log"
    )

    match = await child.wait_for_line(re.compile(r"grandchild (\d+)"), 30)
    grandchild = int(match.group(1))
    assert _running(grandchild)
    started = time.monotonic()
    await children.stop_all(grace=0.3)
    assert time.monotonic() - started < 5
    assert child.returncode == -signal.SIGKILL
    await _assert_all_gone([child.pid, grandchild])
    assert (tmp_path / "out.log").read_text().startswith("grandchild ")


async def test_a_child_that_exits_early_names_itself_with_its_last_lines(tmp_path: Path) -> None:

    children = Children()
    child = await children.start(
        "model server",
        [
            sys.executable,
            "-c",
            "print('loading'); print('CUDA out of memory'); raise SystemExit(4)",
        ],
        os.environ,
        tmp_path / "out.log",
    )
    with pytest.raises(Exception, match="exited with status 4") as caught:
        await child.wait_for_line(re.compile("never printed"), 30)
    assert "out of memory" in str(caught.value)
    await children.stop_all()


def test_hello_world_config_uses_the_demo_server() -> None:
    config = load_config("hello_world")
    assert config.name == "hello_world"
    assert config.model_server.load_patterns == [LOADED_LINE]
    assert config.model_server.health_path == "/health"
    assert [route.path for route in config.routes] == ["/v1/completions", "/v1/chat/completions"]
    route = config.routes[0]
    assert route.compute_workload({"max_tokens": 40}, cost=1) == 40
    assert route.produced_work is not None
    assert route.produced_work({"usage": {"completion_tokens": 7}}) == 7
    assert route.produced_work({"choices": []}) is None
    dataset = Path(str(config.benchmark.dataset_file))
    payloads = [orjson.loads(line) for line in dataset.read_text().splitlines()]
    assert len(payloads) >= 8
    assert all(isinstance(p["prompt"], str) and p["max_tokens"] > 0 for p in payloads)


def test_hello_world_follows_the_environment_like_every_worker() -> None:
    environ = {"MODEL_SERVER_URL": "http://127.0.0.1:9999", "MODEL_LOG": "/tmp/other.log"}
    config = load_config("hello_world", environ=environ)
    assert config.model_server.base_url == "http://127.0.0.1:9999"
    assert config.model_server.log_file == "/tmp/other.log"


def test_spinner_prints_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    spinner = Spinner(stream, interactive=False)
    spinner.start("loading the model")
    spinner.tick()
    spinner.relabel("loading the model")  # unchanged: nothing printed
    spinner.succeed("model loaded")
    spinner.note("a note")
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines[:2]] == ["loading the model", "model loaded"]
    assert lines[2] == "a note"


def test_spinner_redraws_one_line_on_a_terminal() -> None:
    stream = io.StringIO()
    spinner = Spinner(stream, interactive=True)
    spinner.start("benchmarking")
    spinner.tick()
    spinner.fail("benchmark failed")
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.count("benchmarking") == 2
    assert text.endswith("benchmark failed\n")


def test_progress_bar_prints_each_tenth_once_off_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(20, stream, interactive=False, width=10)
    for done in range(21):
        bar.update(done)
    bar.finish(20)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11
    assert lines[-1].endswith("20/20") and lines[-1].startswith("[")


def test_a_master_token_of_the_users_is_used_and_never_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MASTER_TOKEN", "the-users-own-secret")
    session = DevSession(DevOptions(), out=io.StringIO())
    assert session.master_token == "the-users-own-secret"
    assert not session.token_made_up  # start_worker prints the token only when made up
    assert session.worker_environment()["MASTER_TOKEN"] == "the-users-own-secret"
    monkeypatch.delenv("MASTER_TOKEN")
    made_up = DevSession(DevOptions(), out=io.StringIO())
    assert made_up.token_made_up and len(made_up.master_token) >= 24
