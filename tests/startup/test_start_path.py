"""Vast.ai's start script, step by step, on loopback and offline.

On first boot Vast's start script clones `PYWORKER_REPO` into `/workspace/vast-pyworker`,
makes a venv (`python3 -m venv`, or `uv venv -p 3.10` in newer versions), runs
`pip install -r /workspace/vast-pyworker/requirements.txt` (or `uv pip install -r`) with
`/workspace` as the working folder, then, inside the clone, `python3 -m worker` when the
repository has a root `worker.py`, else `python3 -m workers.$BACKEND.worker`, with the
instance's variables. These tests do the same with a clone of this working tree, a venv of the
Python running the tests (CI runs them on 3.10, the Python of Vast's venv, with requirements.txt's
pins installed), and a wheelhouse rebuilt from this interpreter's installed packages in place of
PyPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from packaging.requirements import Requirement

from pyworker.devtools.demo.model_server import DemoSettings
from pyworker.devtools.demo.model_server import create_app as create_demo_app
from tests.conftest import KeyPair
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.wheelhouse import (
    build_wheel,
    build_wheelhouse,
    copy_working_tree,
    stub_wheel,
)

ROOT = Path(__file__).resolve().parents[2]
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
GIT = shutil.which("git")
WORKER_NAMES = sorted(path.parent.name for path in (ROOT / "workers").glob("*/worker.py"))
BUILD_REQUIREMENTS = ["setuptools>=68"]
"""What building pyworker from a git URL needs (pyproject.toml's build-system.requires)."""
GIT_IDENTITY = ["-c", "user.name=pyworker tests", "-c", "user.email=tests@localhost"]

pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")

PUBLIC_PORT = "41234"
PUBLIC_URL = f"http://127.0.0.1:{PUBLIC_PORT}"
"""The address Vast's variables give the worker: what the autoscaler signs."""


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


# --- the pieces of an instance -----------------------------------------------------------------


def git(*arguments: str, cwd: Path) -> str:
    assert GIT is not None
    done = subprocess.run(
        [GIT, *GIT_IDENTITY, *arguments], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def commit_folder(folder: Path) -> str:
    git("init", "-q", "-b", "main", ".", cwd=folder)
    git("add", "-A", ".", cwd=folder)
    git("commit", "-q", "-m", "snapshot", cwd=folder)
    return git("rev-parse", "HEAD", cwd=folder)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository holding this working tree's files (committed or not): PYWORKER_REPO."""
    folder = copy_working_tree(ROOT, tmp_path_factory.mktemp("origin"))
    commit_folder(folder)
    return folder


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pyworker's serving dependencies and its build backend, as wheels: PyPI, offline.

    Only where this venv holds requirements.txt's pins: scripts/test's run that installs the
    lowest versions pyproject.toml allows leaves Vast's start path to the run that has them."""
    if os.environ.get("PYWORKER_TEST_DEPENDENCIES") == "lowest":
        pytest.skip("this run has the lowest versions, not requirements.txt's pins")
    folder = tmp_path_factory.mktemp("wheelhouse")
    build_wheelhouse(requirement_lines(ROOT / "requirements.txt") + BUILD_REQUIREMENTS, folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def clean_environ() -> dict[str, str]:
    """This process's environment without anything that would steer pip, uv or a worker."""
    dropped = ("PIP_", "UV_", "PYWORKER_", "MODEL_", "VAST_", "WORKER_", "TLS_", "VIRTUAL_ENV")
    names = {"BACKEND", "CONTAINER_ID", "REPORT_ADDR", "USE_SSL", "PUBLIC_IPADDR", "UNSECURED"}
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(dropped) and name not in names
    }
    return environ | {"PYWORKER_CACHE_DIR": os.environ["PYWORKER_CACHE_DIR"]}


@dataclass
class Workspace:
    """`/workspace` of one instance: the clone, the venv and the installer."""

    folder: Path
    wheelhouse: Path
    installer: str
    output: list[str] = field(default_factory=list)

    @property
    def clone(self) -> Path:
        return self.folder / "vast-pyworker"

    @property
    def venv(self) -> Path:
        return self.folder / "worker-env"

    def environ(self) -> dict[str, str]:
        """The environment after `source worker-env/bin/activate`."""
        environ = clean_environ()
        return environ | {
            "VIRTUAL_ENV": str(self.venv),
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{environ.get('PATH', '')}",
            "PIP_CONFIG_FILE": os.devnull,  # this machine's pip settings are not Vast's
            "UV_CACHE_DIR": str(self.folder / "uv-cache"),
        }

    def run(self, *command: str | Path, cwd: Path | None = None) -> str:
        done = subprocess.run(
            [str(part) for part in command],
            cwd=cwd or self.folder,
            env=self.environ(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.output.append(f"$ {' '.join(map(str, command))}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, "\n".join(self.output)
        return done.stdout + done.stderr

    def boot(self, repository: Path, ref: str | None = None, *more_wheels: Path) -> None:
        """The start script's first boot: clone, venv, install the clone's requirements.txt."""
        self.run(GIT or "git", "clone", "-q", repository, self.clone)
        if ref:
            self.run(GIT or "git", "checkout", "-q", ref, cwd=self.clone)
        offline: list[str | Path] = ["--no-index"]  # wheels from these folders instead of PyPI
        for folder in (self.wheelhouse, *more_wheels):
            offline += ["--find-links", folder]
        requirements = self.clone / "requirements.txt"
        if self.installer == "uv":
            assert UV is not None
            self.run(UV, "venv", "-q", "--python", sys.executable, self.venv)
            self.run(UV, "pip", "install", "--offline", *offline, "-r", requirements)
        else:
            self.run(sys.executable, "-m", "venv", self.venv)
            self.run("pip", "install", "--disable-pip-version-check", *offline, "-r", requirements)
        version = self.run("python3", "-c", "import sys; print(sys.version_info[:2])")
        assert version.strip() == str(sys.version_info[:2])


def workspace_for(tmp_path: Path, wheelhouse: Path, installer: str) -> Workspace:
    if installer == "uv" and UV is None:
        pytest.skip("uv is not installed (pip install uv; it is a test extra)")
    folder = tmp_path / "workspace"
    folder.mkdir()
    return Workspace(folder, wheelhouse, installer)


@contextlib.asynccontextmanager
async def demo_model_server(log_file: Path) -> AsyncIterator[str]:
    """The model server the image runs, logging to MODEL_LOG."""
    settings = DemoSettings(load_seconds=0.0, tokens_per_second=0.0, log_file=log_file)
    runner = web.AppRunner(create_demo_app(settings), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(address[1] for address in runner.addresses if isinstance(address, tuple))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class WorkerProcess:
    process: asyncio.subprocess.Process
    url: str
    lines: list[str]


@contextlib.asynccontextmanager
async def worker_process(
    workspace: Workspace, module: str, cwd: Path, **extra: str
) -> AsyncIterator[WorkerProcess]:
    """`python3 -m <module>` in the clone with Vast's variables, until it listens; then SIGTERM,
    and it must exit 0."""
    port = free_port()
    environ = workspace.environ() | {
        "CONTAINER_ID": "42",
        "WORKER_PORT": str(port),
        "USE_SSL": "false",
        "PUBLIC_IPADDR": "127.0.0.1",
        f"VAST_TCP_PORT_{port}": PUBLIC_PORT,
        "WORKER_HOST": "127.0.0.1",  # Vast listens on all addresses; the tests on loopback only
        "WORKER_HTTP_PORT": "0",
        **extra,
    }
    process = await asyncio.create_subprocess_exec(
        "python3", "-m", module, cwd=cwd, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    listening = asyncio.get_running_loop().create_future()

    async def read_output() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if " listening on " in line and not listening.done():
                listening.set_result(line.rsplit(" ", 1)[1])
        if not listening.done():
            listening.set_exception(AssertionError(f"{module} exited:\n" + "\n".join(lines)))

    reader = asyncio.create_task(read_output())
    try:
        url = await asyncio.wait_for(listening, 60)
        yield WorkerProcess(process, url, lines)
    finally:
        if process.returncode is None:
            process.terminate()
        status = await asyncio.wait_for(process.wait(), 30)
        await asyncio.wait_for(reader, 10)
    assert status == 0, "\n".join(lines)


async def wait_until_ready(autoscaler: FakeAutoscaler, lines: list[str]) -> dict[str, Any]:
    """The first report of a benchmarked, ready worker."""

    def ready() -> bool:
        return any(report["max_perf"] > 0 for report in autoscaler.worker_status)

    async with autoscaler.received:
        try:
            await asyncio.wait_for(autoscaler.received.wait_for(ready), 90)
        except asyncio.TimeoutError:
            raise AssertionError("never ready:\n" + "\n".join(lines)) from None
    return next(report for report in autoscaler.worker_status if report["max_perf"] > 0)


async def assert_serves_a_signed_request(worker: WorkerProcess, keypair: KeyPair) -> None:
    body = {
        # Signed, as the autoscaler does, for the public address the worker reports.
        "auth_data": keypair.auth_data(PUBLIC_URL),
        "payload": {"prompt": "Hello", "max_tokens": 4},
    }
    async with (
        aiohttp.ClientSession() as client,
        client.post(worker.url + "/v1/completions", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        answer = await response.json()
    assert answer["usage"]["completion_tokens"] == 4


@pytest.fixture
async def autoscaler(keypair: KeyPair) -> AsyncIterator[FakeAutoscaler]:
    async with FakeAutoscaler(keypair.pem) as recording:
        yield recording


# --- the start script's paths ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["pip", "uv"])
async def test_start_script_installs_requirements_and_serves_workers_backend(
    tmp_path: Path,
    origin: Path,
    wheelhouse: Path,
    autoscaler: FakeAutoscaler,
    keypair: KeyPair,
    installer: str,
) -> None:
    workspace = workspace_for(tmp_path, wheelhouse, installer)
    await asyncio.to_thread(workspace.boot, origin)

    log_file = tmp_path / "model.log"
    async with (
        demo_model_server(log_file) as model_url,
        worker_process(
            workspace,
            "workers.hello_world.worker",  # BACKEND=hello_world
            cwd=workspace.clone,
            REPORT_ADDR=autoscaler.url,
            MODEL_SERVER_URL=model_url,
            MODEL_LOG=str(log_file),
        ) as worker,
    ):
        report = await wait_until_ready(autoscaler, worker.lines)
        assert report["id"] == 42
        assert report["url"] == PUBLIC_URL  # PUBLIC_IPADDR, VAST_TCP_PORT_<port>
        assert not report["error_msg"]
        await assert_serves_a_signed_request(worker, keypair)


@pytest.mark.slow
async def test_every_worker_module_serves_from_the_clone(
    tmp_path: Path, origin: Path, wheelhouse: Path, autoscaler: FakeAutoscaler
) -> None:
    workspace = workspace_for(tmp_path, wheelhouse, "uv")
    await asyncio.to_thread(workspace.boot, origin)

    assert WORKER_NAMES  # hello_world, openai, tgi, comfyui...
    for name in WORKER_NAMES:
        async with (
            worker_process(
                workspace,
                f"workers.{name}.worker",
                cwd=workspace.clone,
                REPORT_ADDR=autoscaler.url,
                MODEL_SERVER_URL=f"http://127.0.0.1:{free_port()}",  # no model server yet
                MODEL_LOG=str(tmp_path / f"{name}.log"),
            ) as worker,
            aiohttp.ClientSession() as client,
            client.get(worker.url + "/health") as response,
        ):
            assert response.status == 200, name


TEMPLATE_WORKER = '''\
"""A template repository's worker: the model server its image starts, served by pyworker."""

from pyworker.config import BenchmarkConfig, ModelServerConfig, RouteConfig, WorkerConfig
from pyworker.devtools.demo.model_server import LOADED_LINE

worker = WorkerConfig(
    name="my-template",
    model_server=ModelServerConfig(
        base_url="http://127.0.0.1:18000",
        log_file="/var/log/model.log",
        health_path="/health",
        load_patterns=[LOADED_LINE],
    ),
    routes=[RouteConfig(path="/v1/completions", workload="max_tokens")],
    benchmark=BenchmarkConfig(
        route="/v1/completions", dataset=[{"prompt": "Hi", "max_tokens": 8}], rounds=1
    ),
)

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
'''


def template_repository(folder: Path, pyworker_requirement: str) -> Path:
    """A template author's repository: a root worker.py and a requirements.txt that pins
    pyworker."""
    folder.mkdir()
    (folder / "worker.py").write_text(TEMPLATE_WORKER)
    (folder / "requirements.txt").write_text(pyworker_requirement + "\n")
    commit_folder(folder)
    return folder


def pyworker_wheel(origin: Path, wheelhouse: Path, folder: Path) -> Path:
    """pyworker's wheel, built offline from the origin (what PyPI would serve)."""
    build_wheel(origin, folder, ["--no-index", "--find-links", str(wheelhouse)], clean_environ())
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("installer", "pin"),
    [("uv", "git"), ("pip", "version")],
    # pip before 23.1 (the one a Python 3.10 venv starts with) refuses a git+file URL, which has
    # no host; a template's git+https URL has one.
)
async def test_template_repository_worker_py_runs_with_python_m_worker(
    tmp_path: Path,
    origin: Path,
    wheelhouse: Path,
    autoscaler: FakeAutoscaler,
    keypair: KeyPair,
    installer: str,
    pin: str,
) -> None:
    wheels = tmp_path / "pyworker-wheel"
    wheels.mkdir()
    if pin == "git":
        commit = git("rev-parse", "HEAD", cwd=origin)
        requirement = f"pyworker-serverless @ git+file://{origin}@{commit}"
    else:
        await asyncio.to_thread(pyworker_wheel, origin, wheelhouse, wheels)
        requirement = "pyworker-serverless==0.1.0"
    repository = template_repository(tmp_path / "template", requirement)
    workspace = workspace_for(tmp_path, wheelhouse, installer)
    ref = git("rev-parse", "HEAD", cwd=repository)  # PYWORKER_REF
    await asyncio.to_thread(workspace.boot, repository, ref, wheels)

    log_file = tmp_path / "model.log"
    async with (
        demo_model_server(log_file) as model_url,
        worker_process(
            workspace,
            "worker",  # a worker.py at the repository's root
            cwd=workspace.clone,
            REPORT_ADDR=autoscaler.url,
            MODEL_SERVER_URL=model_url,
            MODEL_LOG=str(log_file),
        ) as worker,
    ):
        report = await wait_until_ready(autoscaler, worker.lines)
        assert report["id"] == 42
        await assert_serves_a_signed_request(worker, keypair)
    # pyworker came from the pinned commit, installed into the venv, not from a folder nearby
    where = workspace.run("python3", "-c", "import pyworker; print(pyworker.__file__)")
    assert where.strip().startswith(str(workspace.venv))


# --- an unsupported Python ---------------------------------------------------------------------


def python_3_9() -> str:
    """A Python 3.9 of this machine (PATH or pyenv); the test skips without one."""
    candidates = [shutil.which("python3.9") or ""]
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates += sorted(str(path) for path in pyenv_root.glob("versions/3.9.*/bin/python3.9"))
    for candidate in filter(None, candidates):
        done = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0 and done.stdout.strip() == "(3, 9)":
            return candidate
    pytest.skip("no Python 3.9 on this machine")


@pytest.mark.slow
@pytest.mark.parametrize("installer", ["pip", "uv"])
def test_pip_and_uv_refuse_pyworker_on_python_3_9(
    tmp_path: Path, origin: Path, wheelhouse: Path, installer: str
) -> None:
    """A template's requirements.txt (pyworker pinned) on Python 3.9: the installer's own no."""
    python = python_3_9()
    wheels = pyworker_wheel(origin, wheelhouse, tmp_path / "pyworker-wheel")
    # PyPI has pyworker's dependencies for 3.9; stand-ins let the resolver get that far
    # (every pin, whatever its marker: the markers are 3.9's there, not this Python's).
    for line in requirement_lines(ROOT / "requirements.txt"):
        needed = Requirement(line)
        pins = [spec.version for spec in needed.specifier if spec.operator == "=="]
        version = pins[0] if pins else importlib.metadata.version(needed.name)
        stub_wheel(needed.name, version, wheels)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyworker-serverless==0.1.0\n")
    venv = tmp_path / "worker-env"
    environ = clean_environ() | {
        "PIP_CONFIG_FILE": os.devnull,
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
    }
    offline = ["--no-index", "--find-links", str(wheels)]
    if installer == "uv":
        if UV is None:
            pytest.skip("uv is not installed")
        subprocess.run([UV, "venv", "-q", "--python", python, str(venv)], env=environ, check=True)
        command = [UV, "pip", "install", "--python", str(venv / "bin" / "python"), "--offline"]
    else:
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        command = [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check"]
    done = subprocess.run(
        [*command, *offline, "-r", str(requirements)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode != 0
    refusal = " ".join((done.stdout + done.stderr).split())
    if installer == "uv":
        assert "pyworker-serverless==0.1.0 requires Python >=3.10" in refusal, refusal
    else:
        assert "Package 'pyworker-serverless' requires a different Python: 3.9" in refusal, refusal


def test_a_clone_run_in_place_on_python_3_9_says_which_python_it_needs(tmp_path: Path) -> None:
    """pyworker's own requirements.txt has no pyworker line to refuse; the clone says it."""
    python = python_3_9()
    done = subprocess.run(
        [python, "-m", "workers.hello_world.worker"],
        cwd=ROOT,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        "pyworker needs Python 3.10 or newer; this is Python " + done.stderr.split()[-1]
    )
    assert "Traceback" not in done.stderr
