"""The configuration reference cannot drift: it is what the generator prints, it describes every
field, it lists every environment variable the code reads; and no document points outside the
repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from pyworker.config.loader import ENV_OVERRIDES
from pyworker.config.variables import VARIABLES
from pyworker.devtools.commands import reference

ROOT = Path(__file__).resolve().parents[2]
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# Product code: what runs on a worker or on a developer's machine (bench/ and tests/ set their
# own variables for the processes they start).
SCANNED_PYTHON = ("pyworker", "workers")
SHELL_SCRIPTS = ("scripts/*.sh", "*.sh")  # the container's start scripts
ROOT_MODULES = "*.py"  # a root worker.py, as Vast's start script runs it
BASH_OWN = frozenset({"BASH_SOURCE", "BASH_COMMAND", "LINENO", "FUNCNAME", "PIPESTATUS", "PATH"})


def test_the_checked_in_reference_is_what_the_generator_prints() -> None:
    text = reference.REFERENCE_FILE.read_text(encoding="utf-8")
    assert text == reference.render(), f"docs/configuration.md is stale: {reference.GENERATOR}"


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n", encoding="utf-8")
    command = [sys.executable, "-m", "pyworker.devtools.commands.reference", "--check", "--file"]
    result = subprocess.run([*command, str(stale)], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert reference.GENERATOR in result.stderr
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pyworker.devtools.commands.reference",
            "--write",
            "--file",
            str(stale),
        ],
        check=True,
        capture_output=True,
    )
    result = subprocess.run([*command, str(stale)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _models() -> Iterator[type[BaseModel]]:
    for section in reference.sections():
        yield section.model


@pytest.mark.parametrize("model", list(_models()), ids=lambda model: model.__name__)
def test_every_field_is_described_in_the_reference(model: type[BaseModel]) -> None:
    described = reference.descriptions(model)
    undescribed = [name for name in model.model_fields if not described.get(name)]
    assert not undescribed, f"{model.__name__}: write a docstring under {undescribed}"
    text = reference.REFERENCE_FILE.read_text(encoding="utf-8")
    section = next(s for s in reference.sections() if s.model is model)
    for name in model.model_fields:
        assert f"`{section.prefix}{name}`" in text


def test_the_questions_new_users_asked_are_answered() -> None:
    text = reference.REFERENCE_FILE.read_text(encoding="utf-8")
    assert "`max_body_size` is a top-level key (32 MiB by default)" in text
    assert "`benchmark.route`; unset, the benchmark uses the first of `routes`" in text
    assert "`max_queue` (10,000 by default) has no unlimited value" in text
    assert "`.has_benchmark`" in text


# --- environment variables ----------------------------------------------------------------------


def _receiver_is_environment(node: ast.expr) -> bool:
    return "env" in ast.unparse(node).lower()


def _reads_environment(func: ast.Attribute) -> bool:
    if func.attr == "getenv":
        return True
    return func.attr in ("get", "pop", "setdefault") and _receiver_is_environment(func.value)


def _name_of(node: ast.expr) -> str | None:
    """An env variable name from a literal, or the fixed start of an f-string (`PREFIX_{x}`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value if ENV_NAME.match(node.value) else None
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            prefix = first.value
            return prefix + "*" if ENV_NAME.match(prefix) else None
    return None


def names_read_in_python(source: str) -> set[str]:
    """Variables read with `<env>.get("X")`, `os.getenv("X")`, `<env>["X"]`, `"X" in <env>`,
    or passed beside an `env`/`environ` argument to a parsing helper (`_flag(env, "X")`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        found: list[ast.expr] = []
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and node.args and _reads_environment(func):
                found.append(node.args[0])
            arguments = node.args
            for index, argument in enumerate(arguments[:-1]):
                if isinstance(argument, ast.Name) and argument.id in ("env", "environ"):
                    found.append(arguments[index + 1])
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if _receiver_is_environment(node.value):
                found.append(node.slice)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.ops[0], ast.In)
            and _receiver_is_environment(node.comparators[0])
        ):
            found.append(node.left)
        names.update(name for item in found if (name := _name_of(item)) is not None)
    return names


def names_read_in_shell(source: str) -> set[str]:
    """Variables a script reads that it does not set itself (or sets from their own value, as
    `X="${X:-default}"`), plus those its embedded Python reads from `os.environ`."""
    referenced = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", source))
    assigned: dict[str, str] = {}
    for match in re.finditer(
        r"^\s*(?:readonly |local |export )?([A-Z][A-Z0-9_]*)=(.*)$", source, re.M
    ):
        assigned.setdefault(match.group(1), match.group(2))
    names = {name for name in referenced if name not in assigned or f"${{{name}" in assigned[name]}
    names |= set(re.findall(r"environ(?:\.get\(|\[)\s*\"([A-Z][A-Z0-9_]*)\"", source))
    names |= {
        f"{prefix}*" for prefix in re.findall(r"environ\.get\(f\"([A-Z][A-Z0-9_]*)\{", source)
    }
    return names - BASH_OWN


def names_read_by_the_code() -> dict[str, str]:
    """Every variable name found, with a file that reads it."""
    found: dict[str, str] = {}
    files = [path for folder in SCANNED_PYTHON for path in (ROOT / folder).rglob("*.py")]
    files += list(ROOT.glob(ROOT_MODULES))
    for path in files:
        for name in names_read_in_python(path.read_text(encoding="utf-8")):
            found.setdefault(name, str(path.relative_to(ROOT)))
    scripts = [path for pattern in SHELL_SCRIPTS for path in ROOT.glob(pattern)]
    assert scripts, "no start script found"
    for path in scripts:
        for name in names_read_in_shell(path.read_text(encoding="utf-8")):
            found.setdefault(name, str(path.relative_to(ROOT)))
    for name in ENV_OVERRIDES:  # read through the table, not by a literal
        found.setdefault(name, "pyworker/config/loader.py")
    return found


def _documented(name: str, documented: set[str]) -> bool:
    if name.endswith("*"):  # an f-string: VAST_TCP_PORT_{port} is VAST_TCP_PORT_<WORKER_PORT>
        return any(entry.startswith(name[:-1]) for entry in documented)
    return name in documented


def test_the_scanner_finds_each_way_of_reading_a_variable() -> None:
    source = """
import os
a = os.environ.get("ALPHA")
b = env.get("BETA", "x")
c = os.getenv("GAMMA")
d = environ["DELTA"]
e = _flag(env, "EPSILON")
f = _port(environ, f"PORT_{port}")
g = "ZETA" in os.environ
h = settings.get("NOT_AN_ENV")
"""
    assert names_read_in_python(source) == {
        "ALPHA",
        "BETA",
        "GAMMA",
        "DELTA",
        "EPSILON",
        "PORT_*",
        "ZETA",
    }
    shell = 'readonly X="${ALPHA:-1}"\nMODEL="${MODEL:-m}"\nY=2\necho "$Y $BETA $X"\n'
    assert names_read_in_shell(shell) == {"ALPHA", "MODEL", "BETA"}


def test_every_variable_the_code_reads_is_in_the_reference() -> None:
    documented = {variable.name for variable in VARIABLES}
    found = names_read_by_the_code()
    assert {"CONTAINER_ID", "MASTER_TOKEN", "OPENAI_SERVER", "MODEL_SERVER_CMD"} <= set(found)
    missing = {name: where for name, where in found.items() if not _documented(name, documented)}
    assert not missing, f"add a row to pyworker/config/variables/, rerun the generator: {missing}"
    text = reference.REFERENCE_FILE.read_text(encoding="utf-8")
    for variable in VARIABLES:
        assert f"| `{variable.name}` |" in text


def test_variables_are_listed_once() -> None:
    names = [variable.name for variable in VARIABLES]
    assert len(names) == len(set(names))


# --- documents stay inside the repository ------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).exists()]


def test_every_relative_link_in_a_document_resolves_inside_the_repository() -> None:
    broken = []
    for document in _markdown_files():
        for target in LINK.findall(document.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (document.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert not broken


def test_no_file_names_a_protocol_document_outside_the_repository() -> None:
    outside = "PROTOCOL" + ".md"  # spelt in parts so that this file does not name them
    shared = "/work/" + "shared"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    naming = []
    for name in listed:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".gguf", ".png", ".jpg"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if outside in text or shared in text:
            naming.append(name)
    assert not naming, f"point at docs/protocol.md instead: {naming}"
    assert (ROOT / "docs" / "protocol.md").exists()


NAME_SHAPED = re.compile(r"""["']([A-Z][A-Z0-9]*_[A-Z0-9_]{2,})["']""")
NOT_VARIABLES = frozenset(
    {
        "FIRST_COMPLETED",  # asyncio.wait's return_when
        "GGML_ASSERT",  # a llama.cpp log line
        "BACKENDS_READY_TIMEOUT",  # a ComfyUI wrapper log line, not to be taken for its load line
        "BACKEND_UNRECOVERABLE",  # a ComfyUI wrapper log line
        "UPDATE_PATH",
    }
)


def test_every_name_shaped_string_in_the_code_is_a_documented_variable_or_known() -> None:
    """Catches the variables the scanner above cannot see: names held in constants
    (`PORT_VARIABLE = "MODEL_SERVER_PORT"`) or tuples (`model_variables=("VLLM_MODEL",)`)."""
    documented = {variable.name for variable in VARIABLES}
    files = [path for folder in SCANNED_PYTHON for path in (ROOT / folder).rglob("*.py")]
    unknown = {
        name: str(path.relative_to(ROOT))
        for path in files
        for name in NAME_SHAPED.findall(path.read_text(encoding="utf-8"))
        if name not in NOT_VARIABLES
        and not _documented(name + "*" if name.endswith("_") else name, documented)
    }
    assert not unknown, (
        "a variable? add a row to pyworker/config/variables/ and rerun the generator; "
        f"else add it to NOT_VARIABLES: {unknown}"
    )
