"""Tell the autoscaler why a worker cannot start, before any worker process runs.

Start-up steps that run before `pyworker run` (the TLS certificate, say) have no reporter:
this posts one minimal `/worker_status/` with `error_msg` to every `REPORT_ADDR` entry, the
message `scripts/on_start.sh` sends for its own failures. Blocking, standard library only.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Mapping

from pyworker.config.environment import DEFAULT_REPORT_ADDR, TRUE_WORDS

logger = logging.getLogger(__name__)

MAX_MESSAGE = 2000
TIMEOUT = 5.0


def error_report(message: str, environ: Mapping[str, str]) -> bytes:
    """The JSON body: the worker's id, token and public url, no load, and the message."""
    try:
        worker_id = int(environ.get("CONTAINER_ID") or 0)
    except ValueError:
        worker_id = 0
    port = environ.get("WORKER_PORT") or "3000"
    public_port = environ.get(f"VAST_TCP_PORT_{port}") or port
    address = environ.get("PUBLIC_IPADDR")
    scheme = "https" if environ.get("USE_SSL", "").strip().lower() in TRUE_WORDS else "http"
    document = {
        "id": worker_id,
        "mtoken": environ.get("MASTER_TOKEN", ""),
        "error_msg": message[:MAX_MESSAGE],
        "loadtime": 0.0,
        "cur_load": 0.0,
        "max_perf": 0.0,
        "url": f"{scheme}://{address}:{public_port}" if address else "",
    }
    return json.dumps(document).encode()


def report_start_error(message: str, environ: Mapping[str, str]) -> None:
    """Post `message` to every autoscaler; nothing in local mode. Never raises."""
    if not environ.get("REPORT_ADDR") and not environ.get("CONTAINER_ID"):
        return
    body = error_report(message, environ)
    for base in (environ.get("REPORT_ADDR") or DEFAULT_REPORT_ADDR).split(","):
        base = base.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            continue
        request = urllib.request.Request(
            base + "/worker_status/",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                response.read(4096)
        except (OSError, ValueError) as error:
            logger.warning("could not report to %s: %s", base, error)
