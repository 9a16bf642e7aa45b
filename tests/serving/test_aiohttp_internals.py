"""aiohttp's private names are read in pyworker/serving/aiohttp_internals.py only, so that an
aiohttp release that moves one is met in one small module, whose reason is written there.

What a release that moves one breaks (a JSON 400 for an unparseable request, the connection
cap) is tested in test_hostile_input.py and test_resources.py.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

from aiohttp import web

from pyworker.serving.aiohttp_internals import between_requests, connection_handler

ROOT = Path(__file__).resolve().parents[2]
INTERNALS = ROOT / "pyworker" / "serving" / "aiohttp_internals.py"
STANDARD_PRIVATE = {"os._exit"}
"""Private-looking names the standard library documents."""


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def modules_using_aiohttp() -> list[Path]:
    return [
        path
        for path in sorted((ROOT / "pyworker").rglob("*.py"))
        if path != INTERNALS and "aiohttp" in path.read_text()
    ]


def private_reads(tree: ast.AST) -> list[str]:
    """`thing._name` on anything but self and cls, and getattr(thing, "_name")."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner not in ("self", "cls") and f"{owner}.{node.attr}" not in STANDARD_PRIVATE:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and is_private(str(node.args[1].value))
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def own_names(cls: type) -> set[str]:
    """The private names pyworker's classes in `cls`'s ancestry define or assign on self."""
    names: set[str] = set()
    for ancestor in cls.__mro__:
        if not ancestor.__module__.startswith("pyworker."):
            continue
        names.update(vars(ancestor))
        tree = ast.parse(textwrap.dedent(inspect.getsource(ancestor)))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign | ast.AugAssign):
                targets = [node.target]
            names.update(
                target.attr
                for target in targets
                if isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            )
    return names


def aiohttp_names(cls: type) -> set[str]:
    return {
        name
        for ancestor in cls.__mro__
        if ancestor.__module__.startswith("aiohttp")
        for name in [*vars(ancestor), *getattr(ancestor, "__slots__", ())]
    }


def inherited_private_uses(path: Path) -> list[str]:
    """In subclasses of aiohttp's classes: `self._name` read but not pyworker's own, and
    private methods of aiohttp's overridden."""
    module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    found = []
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name)
        if not any(ancestor.__module__.startswith("aiohttp") for ancestor in cls.__mro__):
            continue
        own = own_names(cls)
        defined = {
            method.name
            for method in node.body
            if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef)
            and is_private(method.name)
        }
        overridden = aiohttp_names(cls) & defined
        found += [f"{node.name}.{name} overrides aiohttp's" for name in sorted(overridden)]
        found += [
            f"line {read.lineno}: {ast.unparse(read)}"
            for read in ast.walk(node)
            if isinstance(read, ast.Attribute)
            and isinstance(read.value, ast.Name)
            and read.value.id == "self"
            and is_private(read.attr)
            and read.attr not in own
        ]
    return found


def test_no_module_but_aiohttp_internals_reads_a_private_aiohttp_name() -> None:
    found = {
        str(path.relative_to(ROOT)): uses
        for path in modules_using_aiohttp()
        if (uses := private_reads(ast.parse(path.read_text())) + inherited_private_uses(path))
    }
    assert not found, (
        "private aiohttp names outside pyworker/serving/aiohttp_internals.py (move the use "
        f"there, saying why no public API does it): {found}"
    )


def test_the_check_finds_a_private_read() -> None:
    source = "def f(server):\n    return server._kwargs, getattr(server, '_loop')\n"
    assert len(private_reads(ast.parse(source))) == 2


async def test_a_new_connection_is_between_requests() -> None:
    """What the connection cap closes first: a connection that serves no request."""

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(answer)
    handler = connection_handler(server, web.RequestHandler)
    assert isinstance(handler, web.RequestHandler)
    assert between_requests(handler)
