"""The small state file `pyworker dev` leaves while it runs, so `call` and `load` find it.

It is written to `<state dir>/dev.json` (`.pyworker/` in the current directory by default) and,
when `$XDG_RUNTIME_DIR` is set, to `$XDG_RUNTIME_DIR/pyworker/dev.json` too, so a command run
from another directory finds the latest session. A file whose `pid` is no longer running is
stale and ignored; the session removes its files when it stops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

STATE_DIR = ".pyworker"
STATE_FILE = "dev.json"
MAX_STATE_BYTES = 1024 * 1024
DEFAULT_AUTOSCALER = "http://127.0.0.1:8081"
DEFAULT_ENDPOINT = "hello_world"


@dataclass(slots=True)
class DevState:
    pid: int
    autoscaler: str
    endpoint: str
    worker_url: str = ""
    model_server_url: str = ""
    route: str = ""
    example: dict[str, Any] | None = None
    """The payload of the demo request: a sensible default for `call` and `load`."""
    dataset_file: str | None = None
    """The worker's benchmark dataset, if it has a file: `load` cycles through it."""
    children: dict[str, int] = field(default_factory=dict)
    ready: bool = False
    master_token: str = ""
    """The dev worker's MASTER_TOKEN, so `call` can read its routes from `/status`: the file is
    written readable by its owner only."""

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_document(cls, document: object) -> DevState | None:
        if not isinstance(document, dict):
            return None
        pid, autoscaler = document.get("pid"), document.get("autoscaler")
        if not isinstance(pid, int) or not isinstance(autoscaler, str) or not autoscaler:
            return None
        example = document.get("example")
        dataset_file = document.get("dataset_file")
        children = document.get("children")
        return cls(
            pid=pid,
            autoscaler=autoscaler,
            endpoint=_text(document.get("endpoint")) or DEFAULT_ENDPOINT,
            worker_url=_text(document.get("worker_url")),
            model_server_url=_text(document.get("model_server_url")),
            route=_text(document.get("route")),
            example=example if isinstance(example, dict) else None,
            dataset_file=dataset_file if isinstance(dataset_file, str) else None,
            children={
                str(name): value
                for name, value in (children.items() if isinstance(children, dict) else ())
                if isinstance(value, int)
            },
            ready=document.get("ready") is True,
            master_token=_text(document.get("master_token")),
        )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def state_paths(state_dir: Path, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where a session started with `state_dir` writes its state, most specific first."""
    env = os.environ if environ is None else environ
    paths = [state_dir / STATE_FILE]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        paths.append(Path(runtime) / "pyworker" / STATE_FILE)
    return paths


def search_paths(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where `call` and `load` look: the current directory's state dir, then the runtime dir."""
    return state_paths((cwd or Path.cwd()) / STATE_DIR, environ)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but someone else's
    return True


def read_state(path: Path) -> DevState | None:
    """The state in `path` if it is readable and its session still runs; None otherwise."""
    try:
        with path.open("rb") as file:
            text = file.read(MAX_STATE_BYTES)
        state = DevState.from_document(orjson.loads(text))
    except (OSError, orjson.JSONDecodeError):
        return None
    if state is None or not pid_alive(state.pid):
        return None
    return state


def find_state(paths: Iterable[Path] | None = None) -> DevState | None:
    """The first live session found in `paths` (default: `search_paths()`)."""
    for path in search_paths() if paths is None else paths:
        state = read_state(path)
        if state is not None:
            return state
    return None


def write_state(state: DevState, paths: Iterable[Path]) -> None:
    """Write atomically to each path; a path that cannot be written is skipped."""
    data = state.to_json()
    for path in paths:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            os.replace(temporary, path)


def remove_state(paths: Iterable[Path], pid: int) -> None:
    """Remove the files that still describe session `pid` (a newer session's are kept)."""
    for path in paths:
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            state = DevState.from_document(orjson.loads(path.read_bytes()))
            if state is not None and state.pid == pid:
                path.unlink()
