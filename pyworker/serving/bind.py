"""Where the worker listens, and what to tell someone who will not reach it there.

The address comes from the environment (pyworker.config.environment): `WORKER_HOST` when set; else
`0.0.0.0` on the platform (`CONTAINER_ID` or `REPORT_ADDR` set) and `127.0.0.1` in local mode,
where signatures are not checked, so that an unsigned worker is never exposed by accident.

Two cases are worth a line at start, since both fail silently otherwise:

- loopback, by default, inside a container in local mode: `docker run -p` forwards to the
  container's own interface, not its loopback, so nothing outside would reach the worker (the
  pyworker image sets `WORKER_HOST=0.0.0.0` for this reason). Only a note (INFO): working
  inside a container (a dev container, a sandbox) reaches loopback fine, and the worker cannot
  tell which is meant. Nothing at all when `WORKER_HOST` chose the address, or outside a
  container;
- every interface without signature checks (a warning): whoever reaches the port can use the
  model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pyworker.config.environment import Environment

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
CONTAINER_MARKERS = (".dockerenv", "run/.containerenv")
"""Files Docker and Podman create at the root of a container's filesystem."""


def running_in_container(root: Path = Path("/"), environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs in a container (Docker, Podman, systemd-nspawn, LXC)."""
    env = os.environ if environ is None else environ
    if env.get("container"):  # set by Podman, systemd-nspawn and LXC
        return True
    return any((root / marker).exists() for marker in CONTAINER_MARKERS)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def bind_notes(environment: Environment, in_container: bool) -> list[str]:
    """What to say (INFO) about the listen address at start; empty when nothing is worth it."""
    host, port = environment.host, environment.worker_port
    if not (in_container and environment.local and is_loopback(host)):
        return []
    if environment.host_chosen:
        return []
    return [
        f"listening on {host} inside a container (local mode, no WORKER_HOST): reachable "
        "from inside it only; to publish the port with `docker run -p`, set "
        f"WORKER_HOST=0.0.0.0 (the pyworker image does) and publish it on the host's "
        f"loopback: docker run -p 127.0.0.1:{port}:{port} ..."
    ]


def bind_warnings(environment: Environment, in_container: bool) -> list[str]:
    """What to warn about the listen address at start; empty when nothing is amiss."""
    host, port = environment.host, environment.worker_port
    warnings: list[str] = []
    if environment.unsecured and not is_loopback(host):
        warnings.append(
            f"signatures are not checked (UNSECURED) and the worker listens on {host}: whoever "
            f"reaches port {port} can use the model server; publish it on loopback only "
            f"(docker run -p 127.0.0.1:{port}:{port} ...), or set REPORT_ADDR so that every "
            "request must be signed by the autoscaler"
        )
    return warnings
