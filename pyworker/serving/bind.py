"""Where the worker listens, and what to tell someone who will not reach it there.

The address comes from the environment (pyworker.config.environment): `WORKER_HOST` when set; else
`0.0.0.0` on the platform (`CONTAINER_ID` or `REPORT_ADDR` set) and `127.0.0.1` in local mode,
where signatures are not checked, so that an unsigned worker is never exposed by accident.

Two cases deserve a warning at start, since both fail silently otherwise:

- loopback inside a container in local mode: `docker run -p` forwards to the container's own
  interface, not its loopback, so nothing outside reaches the worker (the pyworker image sets
  `WORKER_HOST=0.0.0.0` for this reason);
- every interface without signature checks: whoever reaches the port can use the model.
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


def bind_warnings(environment: Environment, in_container: bool) -> list[str]:
    """What to warn about the listen address at start; empty when nothing is amiss."""
    host, port = environment.host, environment.worker_port
    warnings: list[str] = []
    if in_container and environment.local and is_loopback(host):
        warnings.append(
            f"listening on {host} inside a container (local mode: no CONTAINER_ID, no "
            "REPORT_ADDR, no WORKER_HOST): `docker run -p` cannot reach "
            f"it; set WORKER_HOST=0.0.0.0 (the pyworker image does) and publish the port on "
            f"the host's loopback: docker run -p 127.0.0.1:{port}:{port} ..."
        )
    if environment.unsecured and not is_loopback(host):
        warnings.append(
            f"signatures are not checked (UNSECURED) and the worker listens on {host}: whoever "
            f"reaches port {port} can use the model server; publish it on loopback only "
            f"(docker run -p 127.0.0.1:{port}:{port} ...), or set REPORT_ADDR so that every "
            "request must be signed by the autoscaler"
        )
    return warnings
