"""Wheels rebuilt from this interpreter's installed packages: an offline stand-in for PyPI.

A test that runs `pip install -r requirements.txt` as Vast's start script does must not
download anything. Every installed distribution still holds the files its wheel put in
site-packages and their list (RECORD), so zipping them again, with the dist-info that names
the wheel's tag, gives a wheel pip and uv install like the one from PyPI. Files the wheel put
outside site-packages (console scripts) are left out: installers write those again from
`entry_points.txt`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LEFT_OUT = frozenset({"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"})


def build_wheelhouse(requirements: Iterable[str], folder: Path) -> list[Path]:
    """Wheels of the installed distributions `requirements` need on this interpreter."""
    folder.mkdir(parents=True, exist_ok=True)
    pending = [(Requirement(line), "") for line in requirements]
    done: set[str] = set()
    wheels = []
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        extras = sorted(requirement.extras)
        for wanted_extra in ["", *extras]:
            key = f"{name}[{wanted_extra}]"
            if key in done:
                continue
            done.add(key)
            distribution = importlib.metadata.distribution(name)
            if not requirement.specifier.contains(distribution.version, prereleases=True):
                raise LookupError(f"{requirement} is needed; {distribution.version} is installed")
            if wanted_extra == "":
                wheels.append(rebuild_wheel(distribution, folder))
            for needed in distribution.requires or []:
                pending.append((Requirement(needed), wanted_extra))
    return wheels


def rebuild_wheel(distribution: importlib.metadata.Distribution, folder: Path) -> Path:
    files = [
        path
        for path in distribution.files or []
        if path.parts[0] != ".."
        and "__pycache__" not in path.parts
        and not (path.parts[0].endswith(".dist-info") and path.name in LEFT_OUT)
    ]
    dist_info = next(path.parts[0] for path in files if path.parts[0].endswith(".dist-info"))
    tags = [
        line.split(":", 1)[1].strip()
        for line in (distribution.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    python_tag = ".".join(sorted({tag.split("-")[0] for tag in tags}))
    abi_tag = ".".join(sorted({tag.split("-")[1] for tag in tags}))
    platform_tag = ".".join(sorted({tag.split("-")[2] for tag in tags}))
    stem = dist_info.removesuffix(".dist-info")
    wheel = folder / f"{stem}-{python_tag}-{abi_tag}-{platform_tag}.whl"
    record = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            data = Path(str(distribution.locate_file(path))).read_bytes()
            archive.writestr(path.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path.as_posix()},sha256={digest.decode()},{len(data)}")
        record_name = f"{dist_info}/RECORD"
        record.append(f"{record_name},,")
        archive.writestr(record_name, "\n".join(record) + "\n")
    return wheel


def stub_wheel(name: str, version: str, folder: Path) -> Path:
    """An empty pure-Python wheel that satisfies `name==version` and needs nothing.

    For a resolver that must get past a package's dependencies to reach the check under test
    (an installer on a Python the real wheels were not built for)."""
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    files = {
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{stem}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        record = []
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
            archive.writestr(path, data)
        record.append(f"{stem}.dist-info/RECORD,,")
        archive.writestr(f"{stem}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


def copy_working_tree(root: Path, folder: Path) -> Path:
    """The files of the git working tree at `root` (committed or not, ignored ones left out)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = root / name
        if source.is_file() and not source.is_symlink():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return folder


def build_wheel(
    source: Path,
    folder: Path,
    options: Sequence[str] = ("--no-build-isolation", "--no-index"),
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The wheel of the project at `source`, built offline: by default with the build backend
    installed here (no build isolation, nothing downloaded)."""
    environ = os.environ if environ is None else environ
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *options,
         "--wheel-dir", str(folder), str(source)],
        env={**environ, "PIP_CONFIG_FILE": os.devnull},
        capture_output=True, check=True, timeout=300,
    )  # fmt: skip
    return next(folder.glob("*.whl"))
