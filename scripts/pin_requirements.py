#!/usr/bin/env python3
"""Write requirements.txt: the newest versions of pyworker's runtime dependencies, and of theirs,
that pyproject.toml allows, resolved by pip on Python 3.10 (the venv Vast's start script makes)
and on 3.11; a package only 3.10 needs gets `python_version < "3.11"`.

Resolved together with Vast's SDK (`vastai-sdk`), which the start script installs after
requirements.txt into the same venv: the SDK pins some of the same packages (cryptography), and
pins it would replace would not be what the instance runs.

Vast's start path installs requirements.txt on every new instance, so it pins: a new release
reaches the fleet only through a commit that scripts/test has run (its 3.10 run installs exactly
these versions). Run it to take newer releases, then scripts/test. Needs the package index.

    python3 scripts/pin_requirements.py [python3.10] [python3.11]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# pyworker's serving dependencies, for Vast.ai's start script: it clones this repository,
# runs `pip install -r <clone>/requirements.txt` (or `uv pip install -r`) from another folder,
# then `python3 -m workers.$BACKEND.worker` inside the clone, which imports pyworker from there.
# No line names the clone itself: pip and uv read a path in this file relative to the working
# folder, not to this file. A template repository depends on pyworker-serverless instead
# (docs/template-repository.md).
#
# Exact versions, those scripts/test's Python 3.10 run installs and tests (Vast's start script
# makes a 3.10 venv): every instance of a fleet runs what CI ran, whatever is released since.
# Made by scripts/pin_requirements.py (the newest versions pyproject.toml allows, and their own
# dependencies, beside Vast's SDK, which the start script installs next); a test checks that each
# pin is within pyproject.toml's range.
"""
ONLY_310 = '; python_version < "3.11"'
START_SCRIPT_INSTALLS_TOO = ["vastai-sdk"]


def resolve(python: str, requirements: list[str]) -> dict[str, str]:
    """The distributions pip installs for `requirements` on `python`: name to version."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
             "--report", str(report), *requirements],
            check=True,
        )  # fmt: skip
        installed = json.loads(report.read_text())["install"]
    return {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in installed
    }


def resolve_beside_sdk(python: str, dependencies: list[str]) -> dict[str, str]:
    """pyworker's dependencies and theirs, at the versions they get beside Vast's SDK."""
    needed = resolve(python, dependencies)
    beside = resolve(python, dependencies + START_SCRIPT_INSTALLS_TOO)
    return {name: beside[name] for name in needed}


def main(python310: str = "python3.10", python311: str = "python3.11") -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    on_310 = resolve_beside_sdk(python310, dependencies)
    on_311 = resolve_beside_sdk(python311, dependencies)
    markers: dict[str, str] = {
        canonicalize_name(requirement.name): f"; {requirement.marker}"
        for requirement in map(Requirement, dependencies)
        if requirement.marker is not None
    }
    lines = []
    for name in sorted(on_310.keys() | on_311.keys()):
        if on_311.get(name) == on_310.get(name):
            lines.append(f"{name}=={on_310[name]}{markers.get(name, '')}")
            continue
        if name in on_310:
            lines.append(f"{name}=={on_310[name]}{ONLY_310}")
        if name in on_311:
            lines.append(f'{name}=={on_311[name]}; python_version >= "3.11"')
    (ROOT / "requirements.txt").write_text(HEADER + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
