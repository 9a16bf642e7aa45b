"""`pyworker dev [WORKER]`: the whole serverless path on this machine, in one command.

It starts a local autoscaler (in this process), a model server (the built-in demo by default,
or yours) and the worker as `pyworker run`, wired as on Vast.ai: the worker fetches the
autoscaler's public key, checks every signature and reports to it. It shows the worker
loading, benchmarking and becoming ready, sends one request routed by the autoscaler and
prints the answer, then says how to call it and runs until Ctrl-C, which stops every process
it started (SIGTERM, a bounded wait, then SIGKILL). `--once` stops after that first request.

Logs and caches go to the state dir (`.pyworker/` here by default), with `dev.json`, which
`pyworker call` and `pyworker load` read to find the autoscaler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson

from pyworker.backports import StrEnum
from pyworker.config import WorkerConfig
from pyworker.config.loader import ConfigError, load_config
from pyworker.devtools.commands.children import Child, ChildExited, Children
from pyworker.devtools.commands.devstate import (
    STATE_DIR,
    DevState,
    find_state,
    remove_state,
    state_paths,
    write_state,
)
from pyworker.devtools.commands.progress import Spinner, spin
from pyworker.devtools.commands.routing import (
    RoutingError,
    Target,
    default_cost,
    route_request,
    worker_body,
    worker_url,
)
from pyworker.devtools.demo.model_server import LISTENING_PATTERN as MODEL_LISTENING
from pyworker.devtools.local.autoscaler import LocalAutoscaler
from pyworker.devtools.local.fleet import WorkerPhase
from pyworker.lifecycle.benchmark import BenchmarkError, load_dataset
from pyworker.protocol.signing import SigningKey

DEFAULT_WORKER = "hello_world"
WORKER_ID = 1
WORKER_LISTENING = re.compile(r"listening on (https?://\S+)")
LISTEN_TIMEOUT = 60.0
POLL_INTERVAL = 0.2
PROBE_TIMEOUT = 2.0
REQUEST_TIMEOUT = 120.0
WORKER_GRACE = "5"
"""PYWORKER_GRACE of the dev worker: a local drain need not wait 30 s for requests."""
MAX_SHOWN_ANSWER = 4000


class ModelServerMode(StrEnum):
    DEMO = "demo"
    EXTERNAL = "external"


class Phase(IntEnum):
    """How far the worker has come, as `pyworker dev` shows it."""

    LOADING = 0
    BENCHMARKING = 1
    REGISTERING = 2
    READY = 3


PHASE_LABELS = {
    Phase.LOADING: "loading the model",
    Phase.BENCHMARKING: "benchmarking the model",
    Phase.REGISTERING: "waiting for the autoscaler to see the worker ready",
}
WORKER_STATES = {
    "starting": Phase.LOADING,
    "loading": Phase.LOADING,
    "benchmarking": Phase.BENCHMARKING,
    "ready": Phase.REGISTERING,
}


class DevError(RuntimeError):
    """`pyworker dev` cannot go on; the message says why and where to look."""


@dataclass(frozen=True, slots=True)
class DevOptions:
    target: str = DEFAULT_WORKER
    model_server: ModelServerMode = ModelServerMode.DEMO
    model_command: tuple[str, ...] = ()
    """The model server's command line, split as a shell would (no shell runs it)."""
    model_url: str | None = None
    model_log: str | None = None
    demo_load_seconds: float = 2.0
    demo_tokens_per_second: float = 200.0
    endpoint: str | None = None
    state_dir: Path = Path(STATE_DIR)
    host: str = "127.0.0.1"
    autoscaler_port: int = 0
    worker_port: int = 0
    model_port: int = 0
    overrides: tuple[str, ...] = ()
    once: bool = False
    startup_timeout: float = 600.0

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace) -> DevOptions:
        mode = ModelServerMode(arguments.model_server)
        command = tuple(shlex.split(arguments.model_command or ""))
        if command:
            mode = ModelServerMode.EXTERNAL
        return cls(
            target=arguments.worker,
            model_server=mode,
            model_command=command,
            model_url=arguments.model_url,
            model_log=arguments.model_log,
            demo_load_seconds=max(arguments.demo_load_seconds, 0.0),
            demo_tokens_per_second=max(arguments.demo_tokens_per_second, 0.0),
            endpoint=arguments.endpoint,
            state_dir=Path(arguments.state_dir).absolute(),
            host=arguments.host,
            autoscaler_port=arguments.autoscaler_port,
            worker_port=arguments.worker_port,
            model_port=arguments.model_port,
            overrides=tuple(arguments.overrides),
            once=arguments.once,
            startup_timeout=arguments.startup_timeout,
        )


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "dev",
        help="run the autoscaler, a model server and a worker locally, and call it once",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "worker",
        nargs="?",
        default=DEFAULT_WORKER,
        help="a workers/ folder name, a .toml or .py config, or a module "
        f"(default {DEFAULT_WORKER})",
    )
    model = parser.add_argument_group("model server")
    model.add_argument(
        "--model-server",
        choices=[mode.value for mode in ModelServerMode],
        default=ModelServerMode.DEMO.value,
        help="demo: start the built-in demo server (default); external: use the one in the "
        "worker's config (or --model-url), started by you or by --model-command",
    )
    model.add_argument(
        "--model-command",
        metavar="CMD",
        help="start this command as the model server (implies external); its output is the "
        "model log",
    )
    model.add_argument("--model-url", help="external model server URL (default: the config's)")
    model.add_argument(
        "--model-log",
        metavar="FILE",
        help="external model server log (default: the config's; with --model-command, "
        "STATE_DIR/model.log)",
    )
    model.add_argument(
        "--demo-load-seconds", type=float, default=2.0, help="demo server's simulated load time"
    )
    model.add_argument(
        "--demo-tokens-per-second",
        type=float,
        default=200.0,
        help="demo server's pace per request (0: as fast as possible)",
    )
    parser.add_argument("--endpoint", help="endpoint name (default: the worker config's name)")
    parser.add_argument(
        "--state-dir",
        default=STATE_DIR,
        help=f"logs, caches and dev.json (default: ./{STATE_DIR})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address everything listens on")
    parser.add_argument("--autoscaler-port", type=int, default=0, help="0: a free port (default)")
    parser.add_argument("--worker-port", type=int, default=0, help="0: a free port (default)")
    parser.add_argument("--model-port", type=int, default=0, help="demo server port; 0: free")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a worker config field, as in `pyworker run`",
    )
    parser.add_argument(
        "--once", action="store_true", help="stop everything after the first request"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long the worker may take to become ready (default 600)",
    )
    parser.add_argument("--log-level", default="WARNING", help="of this process (default WARNING)")
    parser.set_defaults(handler=command_dev)


def command_dev(arguments: argparse.Namespace) -> int:
    try:
        options = DevOptions.from_arguments(arguments)
    except ValueError as error:  # a --model-command that does not split, e.g. an open quote
        print(f"pyworker dev: {error}", file=sys.stderr)
        return 2
    session = DevSession(options)
    try:
        return asyncio.run(session.main())
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 130


@dataclass(slots=True)
class Plan:
    """What the session learnt from the worker config before starting anything."""

    config: WorkerConfig
    endpoint: str
    route: str
    example: dict[str, Any]
    dataset_file: str | None


@dataclass(slots=True)
class Session:
    autoscaler_url: str = ""
    model_url: str = ""
    model_log: str | None = None
    worker_url: str = ""
    children: dict[str, int] = field(default_factory=dict)


class DevSession:
    def __init__(self, options: DevOptions, out: TextIO | None = None) -> None:
        self.options = options
        self.out = out or sys.stdout
        self.spinner = Spinner(self.out)
        self.children = Children()
        self.autoscaler: LocalAutoscaler | None = None
        self.session = Session()
        self.paths = state_paths(options.state_dir)
        self._signals = 0
        # The worker shows its error lines and benchmark only to its MASTER_TOKEN's holder.
        self.master_token = os.environ.get("MASTER_TOKEN") or secrets.token_urlsafe(24)

    # -- the whole run ---------------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, stop)
        work = asyncio.create_task(self.run())
        stopped = asyncio.create_task(stop.wait())
        ticker = asyncio.create_task(spin(self.spinner))
        try:
            done, _ = await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                code = work.result()
            else:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                code = 0
        finally:
            stopped.cancel()
            await self.shutdown()
            ticker.cancel()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        return code

    def _on_signal(self, stop: asyncio.Event) -> None:
        """The first signal stops everything in order; a second one kills what is left."""
        self._signals += 1
        loop = asyncio.get_running_loop()
        if self._signals == 1:
            text = "stopping (press Ctrl-C again to kill everything now)"
            stop.set()
        else:
            text = "killing every process started"
            self.children.kill_all()
        loop.run_in_executor(None, self.spinner.note, text)

    async def run(self) -> int:
        """Start everything and serve; the exit status (a signal cancels it)."""
        try:
            plan = await self.prepare()
            await self.start_autoscaler(plan)
            await self.start_model_server(plan)
            worker = await self.start_worker(plan)
            await self.wait_until_ready(plan, worker)
            answered = await self.demo_request(plan)
            self._write_state(plan, ready=True)
            if self.options.once:
                return 0 if answered else 1
            await self._note(self.how_to_call(plan))
            child = await self.children.wait_any_exit()
            raise child.exit_error()
        except (
            DevError,
            ChildExited,
            ConfigError,
            TimeoutError,
            asyncio.TimeoutError,
            OSError,
        ) as error:
            await asyncio.to_thread(self.spinner.fail, str(error))
            return 2 if isinstance(error, ConfigError) else 1

    async def shutdown(self) -> None:
        if not self.children.started and self.autoscaler is None:
            return
        await asyncio.to_thread(self.spinner.start, "stopping the worker and the model server")
        await self.children.stop_all()
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        await asyncio.to_thread(remove_state, self.paths, os.getpid())
        await asyncio.to_thread(self.spinner.succeed, "stopped every process started")

    # -- the steps -------------------------------------------------------------------------------

    async def prepare(self) -> Plan:
        options = self.options
        running = await asyncio.to_thread(find_state, self.paths[:1])
        if running is not None and running.pid != os.getpid():
            raise DevError(
                f"another `pyworker dev` (pid {running.pid}) uses {options.state_dir}: "
                "stop it, or pass --state-dir"
            )
        await asyncio.to_thread(_prepare_state_dir, options.state_dir)
        config = await asyncio.to_thread(load_config, options.target, options.overrides)
        route = config.benchmark.route or config.routes[0].path
        try:
            payloads = await asyncio.to_thread(load_dataset, config.benchmark)
        except BenchmarkError:
            payloads = [{}]
        dataset_file = config.benchmark.dataset_file
        if dataset_file:
            dataset_file = await asyncio.to_thread(os.path.abspath, dataset_file)
        return Plan(
            config=config,
            endpoint=options.endpoint or config.name,
            route=route,
            example=payloads[0],
            dataset_file=dataset_file,
        )

    async def start_autoscaler(self, plan: Plan) -> None:
        await asyncio.to_thread(self.spinner.start, "starting the local autoscaler")
        key = await asyncio.to_thread(SigningKey.generate)
        self.autoscaler = LocalAutoscaler(plan.endpoint, key=key)
        url = await self.autoscaler.start(self.options.host, self.options.autoscaler_port)
        self.session.autoscaler_url = url
        await asyncio.to_thread(
            self.spinner.succeed, f"local autoscaler on {url} (dashboard: {url}/)"
        )

    async def start_model_server(self, plan: Plan) -> None:
        options, server = self.options, plan.config.model_server
        if options.model_server is ModelServerMode.DEMO:
            await self._start_demo()
            return
        self.session.model_url = (options.model_url or server.base_url).rstrip("/")
        if options.model_command:
            log = options.model_log or str(options.state_dir / "model.log")
            if not options.model_log:
                await asyncio.to_thread(_remove, Path(log))  # no load line of an earlier run
            await asyncio.to_thread(self.spinner.start, "starting the model server")
            child = await self.children.start(
                "model server",
                options.model_command,
                {**os.environ, "MODEL_LOG": log},
                Path(log),
                output_to_file=True,
            )
            self.session.children[child.name] = child.pid
            self.session.model_log = log
            message = f"model server started (pid {child.pid}, log: {_shown(Path(log))})"
        else:
            self.session.model_log = options.model_log or server.log_file
            message = "using the model server of the config"
        await asyncio.to_thread(
            self.spinner.succeed, f"{message}; it should listen on {self.session.model_url}"
        )

    async def _start_demo(self) -> None:
        options = self.options
        log = options.state_dir / "model.log"
        await asyncio.to_thread(_remove, log)  # an old load line must not make the worker ready
        await asyncio.to_thread(self.spinner.start, "starting the demo model server")
        argv = [
            sys.executable, "-m", "pyworker.devtools.demo.model_server",
            "--host", options.host,
            "--port", str(options.model_port),
            "--log-file", str(log),
            "--load-seconds", str(options.demo_load_seconds),
            "--tokens-per-second", str(options.demo_tokens_per_second),
        ]  # fmt: skip
        child = await self.children.start(
            "demo model server", argv, os.environ, options.state_dir / "model-server.out"
        )
        self.session.children[child.name] = child.pid
        match = await child.wait_for_line(MODEL_LISTENING, LISTEN_TIMEOUT)
        self.session.model_url = match.group(1).rstrip("/")
        self.session.model_log = str(log)
        await asyncio.to_thread(
            self.spinner.succeed,
            f"demo model server on {self.session.model_url} (log: {_shown(log)})",
        )

    async def start_worker(self, plan: Plan) -> Child:
        options = self.options
        await asyncio.to_thread(self.spinner.start, f"starting the worker {plan.config.name}")
        reference = options.state_dir / ".has_benchmark"
        argv = [
            sys.executable, "-m", "pyworker", "run", options.target,
            "--port", str(options.worker_port),
            "--set", f"benchmark.reference_file={reference}",
        ]  # fmt: skip
        for override in options.overrides:
            argv += ["--set", override]
        log = options.state_dir / "worker.log"
        await asyncio.to_thread(_remove, log)
        child = await self.children.start("worker", argv, self.worker_environment(), log)
        self.session.children[child.name] = child.pid
        match = await child.wait_for_line(WORKER_LISTENING, LISTEN_TIMEOUT)
        self.session.worker_url = match.group(1).rstrip("/")
        self._write_state(plan, ready=False)
        await asyncio.to_thread(
            self.spinner.succeed,
            f"worker {plan.config.name} on {self.session.worker_url} (log: {_shown(log)})",
        )
        return child

    def worker_environment(self) -> dict[str, str]:
        options, session = self.options, self.session
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("VAST_TCP_PORT_") and key not in ("WORKER_PORT", "USE_SSL")
        }
        environ.update(
            REPORT_ADDR=session.autoscaler_url,
            CONTAINER_ID=str(WORKER_ID),
            UNSECURED="false",
            PYWORKER_STRICT_AUTH="true",  # the local autoscaler signs strictly: verify that way
            WORKER_HOST=options.host,
            PUBLIC_IPADDR=options.host,
            WORKER_HTTP_PORT=str(options.worker_port + 1 if options.worker_port else 0),
            PYWORKER_CACHE_DIR=str(options.state_dir / "cache"),
            PYWORKER_GRACE=WORKER_GRACE,
            MASTER_TOKEN=self.master_token,
        )
        demo = options.model_server is ModelServerMode.DEMO
        if demo or options.model_url:
            environ["MODEL_SERVER_URL"] = session.model_url
        if session.model_log and (demo or options.model_log or options.model_command):
            environ["MODEL_LOG"] = session.model_log
        return environ

    async def wait_until_ready(self, plan: Plan, worker: Child) -> None:
        """Follow the worker's state until the autoscaler routes to it, showing each phase."""
        assert self.autoscaler is not None
        deadline = time.monotonic() + self.options.startup_timeout
        phase = Phase.LOADING
        await asyncio.to_thread(self.spinner.start, PHASE_LABELS[phase])
        operator = {"Authorization": f"Bearer {self.master_token}"}
        async with aiohttp.ClientSession(headers=operator) as client:
            while True:
                exited = self.children.first_exited()
                if exited is not None:
                    raise exited.exit_error()
                state, error = await self._worker_state(client)
                if state == "errored":
                    log = _shown(worker.log_path)
                    raise DevError(f"the worker is errored: {error} (see {log})")
                seen = WORKER_STATES.get(state, phase)
                if seen >= Phase.REGISTERING and self._autoscaler_sees_ready():
                    seen = Phase.READY
                while phase < seen:
                    await self._finish_phase(phase, client)
                    phase = Phase(phase + 1)
                    if phase in PHASE_LABELS:
                        await asyncio.to_thread(self.spinner.start, PHASE_LABELS[phase])
                if phase is Phase.READY:
                    return
                if time.monotonic() > deadline:
                    raise DevError(
                        f"the worker was not ready after {self.options.startup_timeout:g} s "
                        f"(still {PHASE_LABELS[phase]}; see {_shown(worker.log_path)})"
                    )
                await asyncio.sleep(POLL_INTERVAL)

    async def _worker_state(self, client: aiohttp.ClientSession) -> tuple[str, str]:
        try:
            async with client.get(
                self.session.worker_url + "/ready",
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as response:
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return "", ""
        if not isinstance(document, dict):
            return "", ""
        return str(document.get("state") or ""), str(document.get("error") or "")

    def _autoscaler_sees_ready(self) -> bool:
        assert self.autoscaler is not None
        record = self.autoscaler.fleet.workers.get(WORKER_ID)
        return record is not None and self.autoscaler.fleet.phase(record) is WorkerPhase.READY

    async def _finish_phase(self, phase: Phase, client: aiohttp.ClientSession) -> None:
        elapsed = self.spinner.elapsed()
        if phase is Phase.LOADING:
            text = f"model loaded (waited {elapsed:.1f} s)"
        elif phase is Phase.BENCHMARKING:
            text = await self._benchmark_summary(client, elapsed)
        else:
            assert self.autoscaler is not None
            record = self.autoscaler.fleet.workers[WORKER_ID]
            text = (
                f"worker ready: the autoscaler routes to it (max_perf "
                f"{record.report.max_perf:.1f} workload/s, loadtime {record.report.loadtime:.1f} s)"
            )
        await asyncio.to_thread(self.spinner.succeed, text)

    async def _benchmark_summary(self, client: aiohttp.ClientSession, elapsed: float) -> str:
        try:
            async with client.get(
                self.session.worker_url + "/status",
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as response:
                document = await response.json(content_type=None)
            benchmark = document.get("benchmark") or {}
            perf = float(benchmark["perf"])
        except (
            aiohttp.ClientError,
            asyncio.TimeoutError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ):
            return f"benchmark done in {elapsed:.1f} s"
        source = "from the cache" if benchmark.get("cached") else f"in {elapsed:.1f} s"
        return f"benchmark done {source}: {perf:.1f} workload/s"

    async def demo_request(self, plan: Plan) -> bool:
        """One request routed by the autoscaler, as a client sends it; True if answered 2xx."""
        target = Target(self.session.autoscaler_url, plan.endpoint)
        payload = plan.example
        await asyncio.to_thread(
            self.spinner.start, f"sending a request to {plan.route} through the autoscaler"
        )
        started = time.monotonic()
        async with aiohttp.ClientSession() as client:
            try:
                auth_data = await route_request(client, target, default_cost(payload), 30.0)
                async with client.post(
                    worker_url(auth_data, plan.route),
                    data=worker_body(auth_data, payload),
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                ) as response:
                    body = await response.read()
                    status = response.status
            except (RoutingError, aiohttp.ClientError, asyncio.TimeoutError) as error:
                await asyncio.to_thread(self.spinner.fail, f"the request failed: {error}")
                return False
        seconds = time.monotonic() - started
        ok = 200 <= status < 300
        summary = (
            f"routed to {auth_data['url']} (request_idx {auth_data.get('request_idx')}); "
            f"answered HTTP {status} in {seconds:.2f} s"
        )
        await asyncio.to_thread(self.spinner.succeed if ok else self.spinner.fail, summary)
        await self._note(
            f"request: POST {plan.route} {_compact(payload)}\nanswer:\n{_answer_text(body)}"
        )
        return ok

    # -- output ----------------------------------------------------------------------------------

    def how_to_call(self, plan: Plan) -> str:
        command = command_name()
        data = shlex.quote(orjson.dumps(plan.example).decode())
        autoscaler, worker = self.session.autoscaler_url, self.session.worker_url
        cost = default_cost(plan.example)
        route_body = shlex.quote(
            orjson.dumps({"endpoint": plan.endpoint, "cost": _plain(cost)}).decode()
        )
        payload_json = orjson.dumps(plan.example).decode().replace("'", "'\\''")
        routes = ", ".join(route.path for route in plan.config.routes)
        logs = ", ".join(
            _shown(self.options.state_dir / name) for name in ("worker.log", "model.log")
        )
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

    async def _note(self, text: str) -> None:
        await asyncio.to_thread(self.spinner.note, text)

    def _write_state(self, plan: Plan, ready: bool) -> None:
        state = DevState(
            pid=os.getpid(),
            autoscaler=self.session.autoscaler_url,
            endpoint=plan.endpoint,
            worker_url=self.session.worker_url,
            model_server_url=self.session.model_url,
            route=plan.route,
            example=plan.example,
            dataset_file=plan.dataset_file,
            children=self.children.pids,
            ready=ready,
            master_token=self.master_token,
        )
        write_state(state, self.paths)


def command_name() -> str:
    """How the user ran pyworker, to print commands they can paste."""
    program = sys.argv[0] if sys.argv else ""
    if not program or program.endswith("__main__.py"):
        return f"{_shown(Path(sys.executable))} -m pyworker"
    found = shutil.which("pyworker")
    if found and Path(found).resolve() == Path(program).resolve():
        return "pyworker"
    return program


def _shown(path: Path) -> str:
    """A path relative to the current directory when it is inside it."""
    with contextlib.suppress(ValueError):
        return str(path.absolute().relative_to(Path.cwd()))
    return str(path)


def _plain(number: float) -> float | int:
    return int(number) if number.is_integer() else number


def _compact(payload: Any) -> str:
    text = orjson.dumps(payload).decode()
    return text if len(text) <= 200 else text[:199] + "…"


def _answer_text(body: bytes) -> str:
    try:
        text = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", errors="replace")
    return text if len(text) <= MAX_SHOWN_ANSWER else text[:MAX_SHOWN_ANSWER] + "\n…"


def _prepare_state_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by `pyworker dev`: nothing here belongs in git\n*\n")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
