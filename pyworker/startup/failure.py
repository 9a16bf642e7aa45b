"""Why pyworker stopped, said on stderr and, for the start script, in `$PYWORKER_ERROR_FILE`.

`scripts/on_start.sh` reports a worker that exits to the autoscaler as `/worker_status/`
`error_msg`. The exit status alone ("pyworker exited with status 2") does not say what to fix;
the script names a file in PYWORKER_ERROR_FILE and pyworker writes its last words there, so
the report carries them ("invalid worker config ...: routes.0.max_queue_time: ...").
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping

ERROR_FILE_VARIABLE = "PYWORKER_ERROR_FILE"
MAX_ERROR_TEXT = 2000
"""Characters kept: the report's error_msg is cut there too."""


def fail(message: str, environ: Mapping[str, str] | None = None) -> None:
    """Print `pyworker: message` on stderr and record it for the start script."""
    print(f"pyworker: {message}", file=sys.stderr, flush=True)
    record(message, environ)


def record(message: str, environ: Mapping[str, str] | None = None) -> None:
    """Write `message` (bounded) to $PYWORKER_ERROR_FILE when set; never raises."""
    path = (os.environ if environ is None else environ).get(ERROR_FILE_VARIABLE)
    if not path:
        return
    text = message if len(message) <= MAX_ERROR_TEXT else message[: MAX_ERROR_TEXT - 1] + "…"
    with (
        contextlib.suppress(OSError),
        open(path, "w", encoding="utf-8", errors="replace") as file,
    ):
        file.write(text + "\n")
