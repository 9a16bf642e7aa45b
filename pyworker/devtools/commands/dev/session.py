"""A `pyworker dev` session: the autoscaler, the model server and the worker, started in order.

Each step shows a spinner line; the session then sends one request as a client would, writes
the state file that `call` and `load` read, and stops every process it started on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp

from pyworker.config.dataset import BenchmarkError, load_dataset
from pyworker.config.loader import ConfigError, WorkerNotFound, load_config
from pyworker.devtools.commands.children import Child, ChildExited, Children
from pyworker.devtools.commands.dev.output import exchange_text, how_to_call, shown, token_text
from pyworker.devtools.commands.dev.plan import DevError, DevOptions, ModelServerMode, Plan
from pyworker.devtools.commands.dev.ready import WORKER_ID, ReadyWatch
from pyworker.devtools.commands.dev.state import (
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
from pyworker.protocol.signing import SigningKey

WORKER_LISTENING = re.compile(r"listening on (https?://\S+)")
LISTEN_TIMEOUT = 60.0
REQUEST_TIMEOUT = 120.0
WORKER_GRACE = "5"
"""PYWORKER_GRACE of the dev worker: a local drain need not wait 30 s for requests."""


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
        # Printed at start when made up here; a MASTER_TOKEN of the user's is never shown.
        self.token_made_up = not os.environ.get("MASTER_TOKEN")

    # -- the whole run ---------------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, stop)
        # A closed terminal: stop in order too, or the children (each in its own session)
        # would outlive it.
        loop.add_signal_handler(signal.SIGHUP, stop.set)
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
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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
            await self.wait_until_ready(worker)
            answered = await self.demo_request(plan)
            self._write_state(plan, ready=True)
            if self.options.once:
                return 0 if answered else 1
            urls = self.session
            text = how_to_call(plan, urls.autoscaler_url, urls.worker_url, self.options.state_dir)
            await self._note(text)
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
        try:
            config = await asyncio.to_thread(load_config, options.target, options.overrides)
        except WorkerNotFound as error:
            raise error.for_command("dev") from None
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
            message = f"model server started (pid {child.pid}, log: {shown(Path(log))})"
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
            f"demo model server on {self.session.model_url} (log: {shown(log)})",
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
            f"worker {plan.config.name} on {self.session.worker_url} (log: {shown(log)})",
        )
        if self.token_made_up:
            await self._note(token_text(self.master_token, self.session.worker_url))
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

    async def wait_until_ready(self, worker: Child) -> None:
        """Follow the worker's state until the autoscaler routes to it, showing each phase."""
        assert self.autoscaler is not None
        watch = ReadyWatch(
            self.spinner, self.children, self.autoscaler, self.session.worker_url, self.master_token
        )
        await watch.wait(worker, self.options.startup_timeout)

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
        await self._note(exchange_text(plan.route, payload, body))
        return ok

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


def _prepare_state_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by `pyworker dev`: nothing here belongs in git\n*\n")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
