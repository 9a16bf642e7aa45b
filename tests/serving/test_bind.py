"""Where the worker listens, and the warnings at start when nobody could reach it there or
everybody could reach it unsigned. No docker engine here: the decision itself is tested, with
the environment the Dockerfile gives its image."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pyworker.config.environment import Environment
from pyworker.serving.bind import bind_notes, bind_warnings, running_in_container

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def image_environment() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    variables: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                name, _, value = word.partition("=")
                variables[name] = value
    return variables


def documented_run_command() -> str:
    match = re.search(r"^#\s+(docker run .*)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "the Dockerfile documents a docker run command"
    return match.group(1)


def test_containers_are_recognised_by_their_marker_files(tmp_path: Path) -> None:
    assert not running_in_container(tmp_path, {})
    (tmp_path / ".dockerenv").touch()
    assert running_in_container(tmp_path, {})
    podman = tmp_path / "podman"
    (podman / "run").mkdir(parents=True)
    (podman / "run" / ".containerenv").touch()
    assert running_in_container(podman, {})
    assert running_in_container(tmp_path / "bare", {"container": "podman"})


def test_the_documented_docker_run_reaches_the_worker_on_the_hosts_loopback_only() -> None:
    image = image_environment()
    environment = Environment.from_env(image)
    # Local mode (no CONTAINER_ID, no REPORT_ADDR), yet reachable through `-p`: every
    # interface of the container.
    assert environment.local and environment.unsecured
    assert environment.host == "0.0.0.0" and environment.worker_port == 3000
    # Unsigned, so the documented command publishes the port on the host's loopback only.
    assert "-p 127.0.0.1:3000:3000" in documented_run_command()
    (warning,) = bind_warnings(environment, in_container=True)
    assert "signatures are not checked" in warning and "-p 127.0.0.1:3000:3000" in warning


def test_loopback_by_default_in_a_container_in_local_mode_is_a_note() -> None:
    environment = Environment.from_env({})
    assert environment.host == "127.0.0.1"  # local mode, outside the image: loopback
    assert bind_notes(environment, in_container=False) == []
    assert bind_warnings(environment, in_container=False) == []
    # Inside a container it may be meant (a dev container) or not (`docker run -p`): a note.
    (note,) = bind_notes(environment, in_container=True)
    assert "to publish the port with `docker run -p`" in note
    assert "WORKER_HOST=0.0.0.0" in note
    assert bind_warnings(environment, in_container=True) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_chosen_with_worker_host_gets_no_note(host: str) -> None:
    environment = Environment.from_env({"WORKER_HOST": host})
    assert environment.local and environment.host_chosen
    assert bind_notes(environment, in_container=True) == []
    assert bind_warnings(environment, in_container=True) == []


@pytest.mark.parametrize(
    "environ",
    [
        {"CONTAINER_ID": "7", "REPORT_ADDR": "http://127.0.0.1:9"},  # the platform
        {"REPORT_ADDR": "http://127.0.0.1:9", "WORKER_HOST": "127.0.0.1"},  # pyworker dev
    ],
    ids=["platform", "dev"],
)
def test_signed_workers_get_no_warning(environ: dict[str, str]) -> None:
    environment = Environment.from_env(environ)
    assert not environment.unsecured
    assert bind_warnings(environment, in_container=True) == []
    if "WORKER_HOST" not in environ:
        assert environment.host == "0.0.0.0"
