"""Find and load a worker config: a `workers/` folder name, a TOML or Python file, or a module.

Overrides come last and win: first the environment (docs/protocol.md: `MODEL_LOG`,
`MODEL_HEALTH_ENDPOINT`, plus `MODEL_SERVER_URL`), then `--set dotted.key=value` from the CLI.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from pyworker.config import WorkerConfig
from pyworker.config.dataset import BenchmarkError, load_dataset
from pyworker.config.environment import CONFIG_VARIABLES, Environment, config_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ENV_OVERRIDES = CONFIG_VARIABLES
CONFIG_FILES = ("worker.py", "worker.toml")


class ConfigError(ValueError):
    """The worker config cannot be used; the message names what is wrong."""


TWINS = {"comfyui-json": "comfyui_json", "vllm-score": "vllm_score"}
"""Vast's backend names that Python cannot import, and the worker folder that defines each.

The repository's root `workers/` has a folder of each spelling; the installed `pyworker/workers`
only the importable one, so `pyworker run comfyui-json` is looked for under both names."""


def workers_dirs() -> list[Path]:
    """Folders searched for `workers/<name>`: the current directory's, then the installed one."""
    installed = Path(__file__).resolve().parents[1] / "workers"  # pyworker/workers
    dirs = [Path.cwd() / "workers", installed]
    extra = os.environ.get("PYWORKER_WORKERS_DIR")
    if extra:
        dirs.insert(0, Path(extra))
    return list(dict.fromkeys(dirs))


def load_config(
    target: str,
    overrides: Sequence[str] = (),
    environ: Environment | Mapping[str, str] | None = None,
) -> WorkerConfig:
    raw, origin = _read_target(target)
    return apply_overrides(raw, overrides, environ, source=target, origin=origin)


def apply_overrides(
    raw: dict[str, Any],
    overrides: Sequence[str] = (),
    environ: Environment | Mapping[str, str] | None = None,
    source: str = "config",
    origin: Path | None = None,
) -> WorkerConfig:
    """The environment's overrides, then `--set` ones, on a raw config; then validation.

    `environ`: the parsed Environment, or variables (None: the process's) parsed here.
    `origin`: the file the config was read from, when there is one (for hints).
    """
    if isinstance(environ, Environment):
        environment_overrides = environ.config_overrides
    else:
        environment_overrides = config_overrides(os.environ if environ is None else environ)
    for dotted, value in environment_overrides.items():
        _assign(raw, dotted, value)
    for item in overrides:
        key, separator, text = item.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        _assign(raw, key.strip(), _parse_value(text))
    return validate_config(raw, source=source, origin=origin)


def validate_config(
    raw: Mapping[str, Any], source: str = "config", origin: Path | None = None
) -> WorkerConfig:
    try:
        config = WorkerConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None
    check_dataset(config, origin or Path(source))
    return config


def check_dataset(config: WorkerConfig, origin: Path | None = None) -> None:
    """Read the benchmark's dataset file now, so a missing or broken one stops the start.

    Found only once the model has loaded, it would cost a model load to learn of a typo.
    Skipped when the benchmark will not read it (an inline dataset, or a known `perf`).
    """
    benchmark = config.benchmark
    if not benchmark.dataset_file or benchmark.dataset or config.perf is not None:
        return
    try:
        load_dataset(benchmark)
    except BenchmarkError as error:
        hint = ""
        if not Path(benchmark.dataset_file).exists():
            hint = _dataset_hint(origin, Path(benchmark.dataset_file))
        raise ConfigError(f"benchmark.dataset_file: {error}{hint}") from None


def _dataset_hint(origin: Path | None, dataset_file: Path) -> str:
    """Where a relative `dataset_file` is read from, for the kind of config it is in."""
    if origin is not None and origin.suffix == ".toml":  # made absolute by `_beside`
        return (
            "; a relative path in a TOML config is read from the TOML file's folder, "
            "one given with --set from the current folder"
        )
    if dataset_file.is_absolute():
        return ""
    if origin is not None and origin.suffix == ".py":
        return (
            f"; a relative path in {origin.name} (or given with --set) is read from the current "
            f"folder, {Path.cwd()}: to read it from beside {origin.name}, write "
            'dataset_file=str(Path(__file__).parent / "benchmark.jsonl")'
        )
    return "; a relative path is read from the current folder"


def _beside(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A TOML config's relative `benchmark.dataset_file` is a path next to the TOML file."""
    benchmark = raw.get("benchmark")
    if isinstance(benchmark, dict):
        dataset_file = benchmark.get("dataset_file")
        if isinstance(dataset_file, str) and dataset_file and not Path(dataset_file).is_absolute():
            benchmark["dataset_file"] = str(folder.absolute() / dataset_file)
    return raw


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"invalid worker config {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        hint = _close_field(item["loc"]) if item["type"] == "extra_forbidden" else ""
        lines.append(f"  {where}: {item['msg']}{hint}")
    return "\n".join(lines)


def _close_field(location: tuple[int | str, ...]) -> str:
    """`; did you mean 'workload'?` for a misspelt field, as a misspelt worker name gets."""
    model: type[BaseModel] | None = WorkerConfig
    for part in location[:-1]:
        if isinstance(part, int) or model is None:
            continue  # a list index: the same model's items
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    if model is None or not isinstance(location[-1], str):
        return ""
    names = [name for name, field in model.model_fields.items() if not field.exclude]
    close = difflib.get_close_matches(location[-1], names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds: itself, or inside `list[...]`, `X | None`..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _read_target(target: str) -> tuple[dict[str, Any], Path | None]:
    """The raw config, and the file it was read from (None: a module without a file)."""
    path = Path(target)
    if path.is_dir():
        path = _config_in(path)
    elif not path.exists() and "/" not in target and not target.endswith((".py", ".toml")):
        spellings = (target, TWINS[target]) if target in TWINS else (target,)
        for folder in workers_dirs():
            found = [folder / name for name in spellings if (folder / name).is_dir()]
            if found:
                path = _config_in(found[0])
                break
        else:
            module = _import_module(target)
            origin = Path(module.__file__) if module.__file__ else None
            return _from_module(module, target), origin
    if not path.exists():
        raise ConfigError(f"worker config {target!r} not found")
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
        return _beside(raw, path.parent), path
    if path.suffix == ".py":
        return _from_module(_import_path(path), str(path)), path
    raise ConfigError(f"{path}: expected a .toml or .py worker config")


def _config_in(folder: Path) -> Path:
    for name in CONFIG_FILES:
        if (folder / name).exists():
            return folder / name
    raise ConfigError(f"{folder} has no {' or '.join(CONFIG_FILES)}")


def _import_path(path: Path) -> ModuleType:
    name = f"pyworker_config_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise  # the worker's own start-up error says what to change
    except Exception as error:
        raise ConfigError(f"{path}: import failed: {error!r}") from error
    return module


def available_workers() -> list[str]:
    """The names `pyworker run <name>` finds in the `workers/` folders, sorted."""
    names: set[str] = set()
    for folder in workers_dirs():
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        names.update(
            entry.name
            for entry in entries
            if entry.is_dir() and any((entry / name).is_file() for name in CONFIG_FILES)
        )
    # `comfyui_json` is the importable twin of the backend name `comfyui-json`: list the one
    # users type.
    names.update(dashed for dashed, importable in TWINS.items() if importable in names)
    return sorted(name for name in names if name.replace("_", "-") not in names - {name})


class WorkerNotFound(ConfigError):
    """`pyworker run NAME` found no worker NAME; `for_command` says it for another command."""

    def __init__(self, name: str) -> None:
        super().__init__(not_found_message(name))
        self.name = name

    def for_command(self, command: str) -> ConfigError:
        return ConfigError(not_found_message(self.name, command))


def not_found_message(name: str, command: str = "run") -> str:
    """Why `name` names no worker, what the workers are, and the closest one, as a
    `pyworker COMMAND` to paste."""
    searched = ", ".join(str(d) for d in workers_dirs())
    lines = [f"worker {name!r} not found: not a file, not a folder in {searched}, not a module"]
    names = available_workers()
    close = difflib.get_close_matches(name.replace("-", "_"), names, n=1, cutoff=0.6)
    if close:
        lines.append(f"did you mean {close[0]!r}?  pyworker {command} {close[0]}")
    if names:
        lines.append(f"workers there: {', '.join(names)}")
    lines.append(f"or give a worker config file: pyworker {command} path/to/worker.toml (or .py)")
    return "\n".join(lines)


def _import_module(name: str) -> ModuleType:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and missing != name and not name.startswith(missing + "."):
            raise ConfigError(f"worker module {name!r}: import failed: {error}") from None
        raise WorkerNotFound(name) from None
    if not hasattr(module, "worker") and module.__file__:
        # A package such as `pyworker.workers.tgi`: its config lives in worker.py beside it.
        folder = Path(module.__file__).parent
        if (folder / "worker.py").exists():
            return importlib.import_module(f"{name}.worker")
    return module


def _from_module(module: ModuleType, source: str) -> dict[str, Any]:
    return raw_config(getattr(module, "worker", None), source)


def raw_config(worker: object, source: str) -> dict[str, Any]:
    """A config as a dict that overrides can be assigned into."""
    if isinstance(worker, WorkerConfig):
        return worker.model_dump(exclude_unset=True)
    if isinstance(worker, dict):
        return dict(worker)
    raise ConfigError(f"{source}: defines no `worker = WorkerConfig(...)`")


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = raw
    for index, part in enumerate(parts[:-1]):
        following = parts[index + 1]
        if isinstance(node, list):
            node = _list_item(node, part, dotted)
            continue
        if part not in node or node[part] is None:
            node[part] = [] if following.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        index = _index(last, dotted)
        if index >= len(node):
            raise ConfigError(f"--set {dotted}: index {index} out of range")
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {dotted}: {'.'.join(parts[:-1])} is not a table")


def _list_item(node: list[Any], part: str, dotted: str) -> Any:
    index = _index(part, dotted)
    if index >= len(node):
        raise ConfigError(f"--set {dotted}: index {index} out of range")
    return node[index]


def _index(part: str, dotted: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"--set {dotted}: {part!r} is not a list index")
    return int(part)


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, booleans, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
