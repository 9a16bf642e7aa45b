"""Generate docs/configuration.md from the config models and the table of environment variables.

    python -m pyworker.devtools.commands.reference            # print the reference
    python -m pyworker.devtools.commands.reference --write    # rewrite docs/configuration.md
    python -m pyworker.devtools.commands.reference --check    # exit 1 when the file is out of date

A field's description is its `Field(description=...)` or the docstring under it in
pyworker/config/worker.py; a variable's is its row in pyworker/config/variables/. Nested
models are found by walking `WorkerConfig`, so a new field or table appears after a rerun with
nothing to change here. tests/devtools/test_reference.py fails when the checked-in file differs
from what this prints.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pyworker.config import BenchmarkConfig, RouteConfig, SessionConfig, WorkerConfig
from pyworker.config.loader import ENV_OVERRIDES
from pyworker.config.variables import VARIABLES, Reader

REFERENCE_FILE = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
GENERATOR = "python -m pyworker.devtools.commands.reference --write"
KiB = 1024


class Section:
    """One config table: the model and the dotted prefix its keys take."""

    def __init__(self, model: type[BaseModel], prefixes: list[str]) -> None:
        self.model = model
        self.prefixes = prefixes

    @property
    def prefix(self) -> str:
        return self.prefixes[0]


def sections(root: type[BaseModel] = WorkerConfig) -> list[Section]:
    """Every model reachable from `root`, each once, in the order their fields are declared."""
    found: dict[type[BaseModel], Section] = {}

    def visit(model: type[BaseModel], prefix: str) -> None:
        if model in found:
            found[model].prefixes.append(prefix)
            return
        found[model] = Section(model, [prefix])
        for name, field in model.model_fields.items():
            for nested, is_list in _nested_models(field.annotation):
                visit(nested, f"{prefix}{name}{'.<n>' if is_list else ''}.")

    visit(root, "")
    return list(found.values())


def _nested_models(
    annotation: Any, in_list: bool = False
) -> Iterator[tuple[type[BaseModel], bool]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, in_list
        return
    origin = typing.get_origin(annotation)
    if origin is list:
        for argument in typing.get_args(annotation):
            yield from _nested_models(argument, True)
    elif origin in (typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            yield from _nested_models(argument, in_list)


def type_name(annotation: Any) -> str:
    """A field's type as a config author writes it; functions are Python-only."""
    if annotation is type(None):
        return "none"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_name(argument) for argument in arguments))
    if origin is list:
        return f"list of {type_name(arguments[0])}" if arguments else "list"
    if origin is dict:
        return "table"
    if origin is typing.Literal:
        return " or ".join(f'`"{argument}"`' for argument in arguments)
    if origin is Callable:
        return "function"
    if isinstance(origin, type):  # AbstractAsyncContextManager[Any]: its class, on every Python
        return type_name(origin)
    if isinstance(annotation, type):
        if annotation.__module__ == "collections.abc":
            return "function"
        return {"str": "string", "float": "number", "int": "integer", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def default_text(name: str, field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, BaseModel):
        return "(table below)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int) and name.endswith("size") and value % KiB == 0:
        return f"`{value}` ({_bytes(value)})"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, int | float):
        return f"`{value:,}`".replace(",", "_") if value >= 10_000 else f"`{value}`"
    return f"`{value!r}`"


def _bytes(value: int) -> str:
    if value % (KiB * KiB) == 0:
        return f"{value // (KiB * KiB)} MiB"
    return f"{value // KiB} KiB"


def limits_text(field: FieldInfo) -> str:
    """The bounds pydantic enforces on a field, as `> 0, <= 300`."""
    words = []
    for item in field.metadata:
        for attribute, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(item, attribute, None)
            if bound is not None:
                words.append(f"{sign} {bound:_}" if isinstance(bound, int) else f"{sign} {bound}")
        if getattr(item, "min_length", None):
            words.append(f"at least {item.min_length}")
        if getattr(item, "allow_inf_nan", True) is False:
            words.append("finite")
    return ", ".join(words)


def descriptions(model: type[BaseModel]) -> dict[str, str]:
    """Each field's `Field(description=...)`, else the docstring under it in the source."""
    found: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        (node,) = ast.parse(textwrap.dedent(inspect.getsource(klass))).body
        assert isinstance(node, ast.ClassDef)
        for statement, following in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                found[statement.target.id] = inspect.cleandoc(following.value.value)
    for name, field in model.model_fields.items():
        if field.description:
            found[name] = field.description
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def config_tables() -> list[str]:
    overridden_by = {dotted: variable for variable, dotted in ENV_OVERRIDES.items()}
    lines: list[str] = []
    for section in sections():
        if section.prefix:
            where = ", ".join(f"`{prefix.rstrip('.')}`" for prefix in section.prefixes)
            lines.append(f"### {where}")
        else:
            lines.append("### Top level")
        lines += ["", _cell(section.model.__doc__ or ""), ""]
        lines.append("| key | type | default | limits | meaning |")
        lines.append("|---|---|---|---|---|")
        described = descriptions(section.model)
        for name, field in section.model.model_fields.items():
            key = f"{section.prefix}{name}"
            meaning = described.get(name, "")
            if key in overridden_by:
                meaning += f" The environment variable `{overridden_by[key]}` overrides it."
            lines.append(
                f"| `{key}` | {type_name(field.annotation)} | {default_text(name, field)} "
                f"| {limits_text(field)} | {_cell(meaning)} |"
            )
        lines.append("")
    return lines


def variable_tables() -> list[str]:
    lines: list[str] = []
    for reader in Reader:
        rows = [variable for variable in VARIABLES if variable.reader is reader]
        if not rows:
            continue
        lines += [f"### {reader.value}", "", "| variable | default | meaning |", "|---|---|---|"]
        lines += [f"| `{v.name}` | {_cell(v.default)} | {_cell(v.meaning)} |" for v in rows]
        lines.append("")
    return lines


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


def questions() -> list[str]:
    """Answers to what new users looked for; every figure is read from the models."""
    body = _default(WorkerConfig, "max_body_size")
    session_body = _default(SessionConfig, "max_body_size")
    max_queue = _default(RouteConfig, "max_queue")
    cache = _default(BenchmarkConfig, "reference_file")
    return [
        f"- **Request body limit.** `max_body_size` is a top-level key ({_bytes(body)} by "
        "default): in TOML write it above the first `[table]`, or pass "
        "`--set max_body_size=67108864`. Session routes have their own, "
        f"`sessions.max_body_size` ({_bytes(session_body)}).",
        "- **The benchmark's route.** `benchmark.route`; unset, the benchmark uses the first "
        "of `routes`. Its payloads come from `benchmark.dataset`, `benchmark.dataset_file` or "
        "`benchmark.generator`, in that order; with none of them it sends `{}`.",
        "- **How the benchmark measures.** A closed-loop ramp: 1, 2, 4, ... requests in flight "
        "while throughput grows, up to the engine's declared limit (`benchmark.limit_probe`) or "
        "`benchmark.max_concurrency`, within `benchmark.max_seconds`, optionally within a p90 "
        "`benchmark.latency_limit` or `benchmark.token_latency_limit`; the best N is then "
        "measured again. docs/benchmark.md defines `max_perf` and each ready "
        "worker's unit; `pyworker bench WORKER` prints the curve.",
        "- **No limit.** `max_concurrency` unset: every admitted request is forwarded at once, "
        "with no queue. `max_queue_time` unset: no wait estimate refuses a request. "
        "`read_timeout` set to none (Python `None`, or `--set routes.0.read_timeout=null`; "
        "TOML has no null): the model server may stay silent for ever. "
        f"`max_queue` ({max_queue:,} by default) has no unlimited "
        "value, on purpose: every queue is bounded; a large number is the same in practice.",
        "- **Files the benchmark writes.** The cache, `$PYWORKER_CACHE_DIR/benchmark.json` "
        "(default `~/.cache/pyworker/benchmark.json`, or `benchmark.cache_file`), keyed by "
        "GPUs, model, route, settings and dataset; and the reference worker's marker "
        f"`{cache}` in the working folder, after a benchmark or a cache hit "
        "(`benchmark.reference_file`; `--set benchmark.reference_file=null` turns it off). "
        "Both are read and written only as regular files: a symlink at either name is "
        "replaced, never followed (move the cache with `PYWORKER_CACHE_DIR`), and a FIFO, a "
        "folder or a device there is left alone with one warning. A worker with a known "
        "`perf` runs no benchmark and writes neither.",
        "- **Local mode.** With neither `CONTAINER_ID` nor `REPORT_ADDR` set the worker reports "
        "nowhere, checks no signature and listens on `127.0.0.1` unless `WORKER_HOST` says "
        "otherwise.",
    ]


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{GENERATOR}` from pyworker/config/worker.py (the docstring under each "
        "field) and pyworker/config/variables/. Edit those and rerun it; "
        "tests/devtools/test_reference.py "
        "fails when this file is out of date. -->",
        "",
        "A worker is a `WorkerConfig`: a TOML file (`pyworker run my-llm.toml`), or Python "
        "(`workers/<name>/worker.py` defining `worker = WorkerConfig(...)`), which may also "
        "carry functions (the fields marked *function* below). Both are validated the same "
        "way: a bad value stops the start with exit code 2 and a message naming the key "
        "(`routes.0.max_queue_time: Input should be greater than 0`).",
        "",
        "Values are applied in this order, the last winning: the config itself, the "
        "environment variables that override a field (`MODEL_SERVER_URL`, `MODEL_LOG`, "
        "`MODEL_HEALTH_ENDPOINT`), then `pyworker run ... --set dotted.key=value` (the value "
        "is read as JSON when it parses, `null` included, else as text; list items by index: "
        "`--set routes.0.max_queue=100`). The keys below are written as `--set` takes them; "
        "`<n>` is a list index.",
        "",
        "## Common questions",
        "",
        *questions(),
        "",
        "## Worker config",
        "",
        *config_tables(),
        "## Environment variables",
        "",
        "Read once at start-up; a value the worker cannot use stops the start with exit code 2 "
        "and a message naming the variable. Booleans take `true`/`false` (also `1`/`0`, "
        "`yes`/`no`, `on`/`off`).",
        "",
        *variable_tables(),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyworker.devtools.commands.reference", description=__doc__.split("\n")[0]
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {REFERENCE_FILE.name}")
    action.add_argument("--check", action="store_true", help="exit 1 when it is out of date")
    parser.add_argument("--file", type=Path, default=REFERENCE_FILE, help="the reference file")
    arguments = parser.parse_args(argv)
    text = render()
    if arguments.write:
        arguments.file.write_text(text, encoding="utf-8")
        print(f"wrote {arguments.file}")
        return 0
    if arguments.check:
        current = arguments.file.read_text(encoding="utf-8") if arguments.file.exists() else ""
        if current != text:
            print(f"{arguments.file} is out of date: run `{GENERATOR}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
