"""The package's shape, checked from its source: sizes, layers, no import cycle, mirrored tests.

Pure `ast` reading, nothing imported: fast, and true of the files as written. docs/architecture.md
describes the layers; `LAYERS` below is the same table, in code.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pyworker"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 6
TEST_HELPER_FOLDERS = frozenset({"support", "fakes"})

LAYERS: dict[str, frozenset[str]] = {
    "backports": frozenset(),
    "protocol": frozenset({"backports"}),
    "config": frozenset({"protocol", "backports"}),
    "upstream": frozenset({"config", "protocol", "backports"}),
    "lifecycle": frozenset({"upstream", "config", "protocol", "backports"}),
    "serving": frozenset(
        {"lifecycle", "upstream", "config", "protocol", "startup.failure", "backports"}
    ),
    "startup": frozenset({"config", "protocol", "backports"}),
}
"""What each layer may import, besides itself and the root package (`__version__`).

A part is a subpackage or a top-level module; an entry may name one module of a part
(`startup.failure`). Top-level modules not listed (cli, entry, the composition root) may import
every part; `test_pyworker_run_never_loads_the_developer_tools` keeps devtools out of their
import-time closure.
"""
APART: dict[str, frozenset[str]] = {
    "devtools": frozenset({"compat"}),
    "compat": frozenset({"devtools", "workers"}),
    "workers": frozenset({"compat"}),
}
"""Parts above the layers, and what each may not import: devtools and compat are apart; the
ready workers are templates on the public API (their client and load scripts use devtools)."""
RUN_ENTRY_POINTS = ("pyworker.__main__", "pyworker.cli", "pyworker.entry")
UPSTREAM_PRIVATE = frozenset({"pyworker.upstream.pool", "pyworker.upstream.connection"})
"""upstream's own modules: everything else (tests of other parts, the bench and the ready
workers included) reaches the model server through the public ones, the facade (`model.py`),
its errors (`errors.py`) and a route's functions (`functions.py`)."""


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    eager: bool
    """At import time: at module level, outside `if TYPE_CHECKING:`."""

    def where(self) -> str:
        return f"{_path(self.importer)}:{self.line} imports {self.imported}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _path(module: str) -> str:
    return str(_modules()[module].relative_to(ROOT))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt], eager: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every statement, with whether it runs at import time (module level, not type-only)."""
    for statement in body:
        yield statement, eager
        if isinstance(statement, ast.If):
            type_only = _is_type_checking(statement.test)
            yield from _statements(statement.body, eager and not type_only)
            yield from _statements(statement.orelse, eager)
        elif isinstance(statement, ast.Try):
            for block in (statement.body, statement.orelse, statement.finalbody):
                yield from _statements(block, eager)
            for handler in statement.handlers:
                yield from _statements(handler.body, eager)
        elif isinstance(statement, ast.With):
            yield from _statements(statement.body, eager)
        elif isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield from _statements(statement.body, eager and isinstance(statement, ast.ClassDef))


def _imported_names(module: str, statement: ast.stmt) -> Iterator[str]:
    modules = _modules()
    if isinstance(statement, ast.Import):
        yield from (alias.name for alias in statement.names)
    elif isinstance(statement, ast.ImportFrom):
        base = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(statement.level - 1):
            base = base.rpartition(".")[0]
        if statement.level:
            source = f"{base}.{statement.module}" if statement.module else base
        else:
            source = statement.module or ""
        yield source
        yield from (
            f"{source}.{alias.name}"
            for alias in statement.names
            if f"{source}.{alias.name}" in modules
        )


@cache
def _imports() -> tuple[Import, ...]:
    found = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for statement, eager in _statements(tree.body, eager=True):
            for name in _imported_names(module, statement):
                if name in _modules() and name != module:
                    found.append(Import(module, name, statement.lineno, eager))
    return tuple(found)


def _part(module: str) -> str:
    """`serving` for pyworker.serving.routes; `cli` for pyworker.cli; "" for the root package."""
    return module.split(".")[1] if "." in module else ""


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_module_is_over_450_lines() -> None:
    too_long = {
        str(path.relative_to(ROOT)): lines
        for path in _modules().values()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, (
        f"modules over {MAX_MODULE_LINES} lines; split each by concept (one concept a module, "
        f"a name that says it): {too_long}"
    )


def test_no_function_is_over_60_lines() -> None:
    too_long = [
        f"{path.relative_to(ROOT)}:{function.lineno} {function.name} ({size} lines)"
        for path in _modules().values()
        for function in _functions(ast.parse(path.read_text()))
        if (size := (function.end_lineno or function.lineno) - function.lineno + 1)
        > MAX_FUNCTION_LINES
    ]
    assert not too_long, (
        f"functions over {MAX_FUNCTION_LINES} lines; give each step a named function: {too_long}"
    )


def test_few_modules_sit_at_the_top_of_the_package() -> None:
    top = sorted(
        path.name
        for path in PACKAGE.glob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    )
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top)} modules at the top of pyworker/ (at most {MAX_TOP_LEVEL_MODULES}): move "
        f"the ones that belong to a subsystem into its subpackage: {top}"
    )


def _allowed(importer: str, imported: str) -> bool:
    part, target = _part(importer), _part(imported)
    if part in APART:
        return target not in APART[part]
    if not target or target == part or part not in LAYERS:
        return True
    allowed = LAYERS[part]
    module_of_part = imported.split(".", 1)[1]
    return target in allowed or any(
        module_of_part == entry or module_of_part.startswith(entry + ".") for entry in allowed
    )


def test_every_part_of_the_package_is_in_the_layer_table() -> None:
    subpackages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    missing = sorted(subpackages - LAYERS.keys() - APART.keys())
    assert not missing, (
        f"new subpackages {missing}: add each to LAYERS in tests/test_architecture.py with what "
        "it may import, and to docs/architecture.md"
    )


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = [
        f"{found.where()}: {_part(found.importer)} may not import {_part(found.imported)}"
        for found in _imports()
        if not _allowed(found.importer, found.imported)
    ]
    assert not wrong, (
        "imports against the layering (tests/test_architecture.py LAYERS): move the code used "
        "down a layer, or pass it in from the composition root:\n  " + "\n  ".join(wrong)
    )


def _absolute_imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every module a file outside the package imports (all absolute), with its line."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, node.lineno
            yield from ((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)


def test_only_upstream_sees_its_connections() -> None:
    """Above upstream, a failure is one of upstream's errors and a request one call of the
    facade: no module there may depend on how the connections work (docs/architecture.md)."""
    wrong = [
        found.where()
        for found in _imports()
        if found.imported in UPSTREAM_PRIVATE and _part(found.importer) != "upstream"
    ]
    own_tests = ROOT / "tests" / "upstream"
    for folder in ("tests", "bench", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if own_tests not in path.parents:
                wrong.extend(
                    f"{path.relative_to(ROOT)}:{line} imports {name}"
                    for name, line in _absolute_imports(path)
                    if name in UPSTREAM_PRIVATE
                )
    assert not wrong, (
        "imports of upstream's private modules (pool, connection) outside pyworker/upstream and"
        " tests/upstream: use ModelClient and pyworker.upstream.errors:\n  " + "\n  ".join(wrong)
    )


def _eager_closure(start: str) -> dict[str, Import | None]:
    """Every module importing `start` loads at import time, with the import that loads it."""
    reached: dict[str, Import | None] = {start: None}
    pending = [start]
    while pending:
        module = pending.pop()
        for found in _imports():
            if found.importer != module or not found.eager:
                continue
            # Python runs the packages above a module first: their imports load too.
            for loaded in [*_packages_above(found.imported), found.imported]:
                if loaded not in reached:
                    reached[loaded] = found
                    pending.append(loaded)
    return reached


def _packages_above(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def test_pyworker_run_never_loads_the_developer_tools() -> None:
    for start in RUN_ENTRY_POINTS:
        closure = _eager_closure(start)
        tools = sorted(module for module in closure if _part(module) == "devtools")
        chains = []
        for module in tools[:3]:
            chain, step = [], closure[module]
            while step is not None:
                chain.append(step.where())
                step = closure[step.importer]
            chains.append(" <- ".join(chain))
        assert not tools, (
            f"{start} loads developer tools at import time; import them inside the command "
            "that needs them:\n  " + "\n  ".join(dict.fromkeys(chains))
        )


NETWORK_LIBRARIES = frozenset({"aiohttp", "http", "socket", "ssl", "urllib.request"})
"""What a module imports to reach the network."""
WIRE_LAYER_CALLS = frozenset({"pyworker.protocol.messages"})
"""The start report's blocking `post`: it runs by file path, before pyworker is installed."""


def test_the_wire_layer_does_no_network_io() -> None:
    """protocol/ is the wire format and its verification: calls live above it (lifecycle/)."""
    calling = []
    for module, path in _modules().items():
        if _part(module) != "protocol" or module in WIRE_LAYER_CALLS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            calling += [
                f"{_path(module)}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0] in NETWORK_LIBRARIES or name in NETWORK_LIBRARIES
            ]
    assert not calling, "network I/O in protocol/; move it to lifecycle/:\n  " + "\n  ".join(
        calling
    )


def _cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the modules along it, or None."""
    visiting: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                return [*visiting[visiting.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported)) is not None:
                return cycle
        visiting.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_no_import_cycle_even_through_type_checking_imports() -> None:
    graph: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], int] = {}
    for found in _imports():
        graph.setdefault(found.importer, set()).add(found.imported)
        lines.setdefault((found.importer, found.imported), found.line)
    cycles = []
    while (cycle := _cycle_from(graph)) is not None:
        cycles.append(
            "\n  ".join(
                f"{_path(importer)}:{lines[importer, imported]} imports {imported}"
                for importer, imported in itertools.pairwise(cycle)
            )
        )
        graph[cycle[-2]].discard(cycle[-1])  # report the next cycle, if any
    assert not cycles, (
        "import cycles (imports inside functions and under TYPE_CHECKING count): break each by "
        "passing the collaborator in, or moving the shared code down a layer:\n  "
        + "\n\n  ".join(cycles)
    )


def test_tests_mirror_the_package_layout() -> None:
    subpackages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    folders = {
        path.name
        for path in (ROOT / "tests").iterdir()
        if path.is_dir() and not path.name.startswith((".", "__"))
    }
    strays = sorted(folders - subpackages - TEST_HELPER_FOLDERS - {"workers"})
    assert not strays, (
        f"tests/ folders that name no pyworker subpackage: {strays}; move their tests to "
        "tests/<subpackage>/ for the code they test"
    )
    untested = sorted(subpackages - folders)
    assert not untested, f"pyworker subpackages without a tests/<name>/ folder: {untested}"


# --- one refusal (docs/architecture.md, "The path of a request") ----------------------------
SERVING = PACKAGE / "serving"
REFUSALS = SERVING / "refusals.py"
ANSWERS = frozenset({"Response", "StreamResponse", "json_response"})
"""What builds an HTTP answer in serving: aiohttp's classes and pyworker.serving.responses."""
NOT_REFUSALS = {("routes.py", 499)}
"""Codes that are no answer to a client: 499 is the ledger's word for a client that left."""


def _literal_statuses(tree: ast.Module) -> Iterator[tuple[int, int]]:
    """(line, code) of every answer built with an error status spelled in the module: a
    literal, or a module-level constant."""
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name) and isinstance(node.value.value, int)
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = node.func
        name = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", "")
        if name not in ANSWERS:
            continue
        given = [*node.args[:1], *(k.value for k in node.keywords if "status" in (k.arg or ""))]
        for value in given:
            code = value.value if isinstance(value, ast.Constant) else None
            if isinstance(value, ast.Name):
                code = constants.get(value.id)
            if isinstance(code, int) and not isinstance(code, bool) and code >= 400:
                yield node.lineno, code


def test_only_the_refusals_module_decides_an_error_status() -> None:
    """A stage that turns a request away raises `Refused`; it never builds its own 4xx/5xx."""
    found = [
        f"serving/{path.name}:{line} answers {code}"
        for path in sorted(SERVING.glob("*.py"))
        if path != REFUSALS
        for line, code in _literal_statuses(ast.parse(path.read_text(encoding="utf-8")))
        if (path.name, code) not in NOT_REFUSALS
    ]
    assert not found, (
        "an error answer built outside pyworker/serving/refusals.py: add a refusal there (the "
        "status policy) and raise it:\n  " + "\n  ".join(found)
    )


def test_refused_is_the_only_exception_that_carries_an_answer() -> None:
    """No other exception in serving holds a response or an HTTP status for its handler."""
    carriers = []
    for path in sorted(SERVING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef) or node.name == "Refused":
                continue
            stores = {
                target.attr
                for target in ast.walk(node)
                if isinstance(target, ast.Attribute)
                and isinstance(target.ctx, ast.Store)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            }
            if stores & {"response", "status", "http_status"}:
                carriers.append(f"serving/{path.name}: {node.name}")
    assert not carriers, (
        "classes in serving that carry an answer besides Refused (raise a refusal from "
        "pyworker/serving/refusals.py instead):\n  " + "\n  ".join(carriers)
    )
