"""Each runtime dependency has a range whose two ends are tested: pyproject.toml's bounds,
constraints/lowest.txt (the lower ones, which scripts/test installs on one Python) and
requirements.txt (the pins Vast's start path installs, which it installs on the other)."""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        canonicalize_name(requirement.name): requirement
        for requirement in map(Requirement, project["dependencies"])
    }


def pins(path: Path) -> dict[str, list[Requirement]]:
    """Each line of `path`, by name (a name may be pinned twice, under exclusive markers)."""
    found: dict[str, list[Requirement]] = {}
    for line in requirement_lines(path):
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {line} is not an exact version"
        found.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    return found


def pinned_version(requirement: Requirement) -> str:
    return next(iter(requirement.specifier)).version


def test_each_runtime_dependency_has_a_lower_and_an_upper_bound() -> None:
    for name, requirement in dependencies().items():
        operators = sorted(specifier.operator for specifier in requirement.specifier)
        assert operators == ["<", ">="], f"{name}: {requirement.specifier}"


def test_constraints_lowest_pins_each_lower_bound() -> None:
    lowest = pins(ROOT / "constraints" / "lowest.txt")
    assert sorted(lowest) == sorted(dependencies())
    for name, requirement in dependencies().items():
        (pin,) = lowest[name]
        (bound,) = (spec.version for spec in requirement.specifier if spec.operator == ">=")
        assert Version(pinned_version(pin)) == Version(bound), f"{name}: {pin}, >={bound}"
        assert pin.marker == requirement.marker, name


def test_requirements_txt_pins_every_dependency_within_its_range() -> None:
    """Vast's start script installs requirements.txt; pip install installs pyproject's."""
    pinned = pins(ROOT / "requirements.txt")
    for name, requirement in dependencies().items():
        assert name in pinned, f"requirements.txt does not pin {name}"
        for pin in pinned[name]:
            assert requirement.specifier.contains(pinned_version(pin)), f"{pin} vs {requirement}"
            if requirement.marker is not None:
                assert pin.marker == requirement.marker, f"{pin} vs {requirement}"


def test_requirements_txt_pins_one_version_for_each_python() -> None:
    environments = [{"python_version": "3.10"}, {"python_version": "3.11"}]
    for name, lines in pins(ROOT / "requirements.txt").items():
        for environment in environments:
            chosen = [
                pin for pin in lines if pin.marker is None or pin.marker.evaluate(environment)
            ]
            assert len(chosen) <= 1, f"{name}: {chosen} on Python {environment}"
