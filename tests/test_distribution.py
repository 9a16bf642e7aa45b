"""pyworker's distribution, `pyworker-serverless`, as a package index would serve it: `python -m
build` makes the sdist and the wheel from the working tree, `twine check` passes, and the wheel
installs offline into a fresh venv of Python 3.10 (the oldest supported, the one Vast's start
script makes), whose `pyworker --version` prints the version.

Offline throughout: the build backend comes from this venv (no build isolation), and the wheel's
dependencies are wheels rebuilt from this interpreter's installed packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.wheelhouse import build_wheelhouse, copy_working_tree

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME = "pyworker-serverless"
OFFLINE = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        sys.version_info[:2] != (3, 10),
        reason="built and installed in scripts/test's Python 3.10 run (the wheel is pure Python)",
    ),
]


def run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd, env=os.environ | OFFLINE, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = copy_working_tree(ROOT, tmp_path_factory.mktemp("source"))
    folder = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", folder, source)
    return folder


def test_the_name_is_pyworker_serverless() -> None:
    assert PROJECT["name"] == NAME
    extras = PROJECT["optional-dependencies"].values()
    assert not [line for lines in extras for line in lines if line.startswith("pyworker[")]


def test_build_makes_an_sdist_and_a_wheel_that_twine_accepts(dist: Path) -> None:
    version = PROJECT["version"]
    sdist = dist / f"pyworker_serverless-{version}.tar.gz"
    wheel = dist / f"pyworker_serverless-{version}-py3-none-any.whl"
    assert sorted(dist.iterdir()) == [wheel, sdist]
    metadata = zipfile.ZipFile(wheel).read(f"pyworker_serverless-{version}.dist-info/METADATA")
    assert f"Name: {NAME}\n" in metadata.decode()
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)


def test_the_wheel_installs_offline_into_a_fresh_venv(dist: Path, tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    build_wheelhouse(PROJECT["dependencies"], wheelhouse)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    (wheel,) = dist.glob("*.whl")
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip", "install", "--quiet"]
    run(*pip, "--find-links", wheelhouse, wheel)

    assert run(venv / "bin" / "pyworker", "--version").strip() == f"pyworker {PROJECT['version']}"
    where = run(venv / "bin" / "python", "-c", "import pyworker; print(pyworker.__file__)")
    assert where.startswith(str(venv)), where
