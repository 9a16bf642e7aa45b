"""pyworker: the worker that sits beside a model server on a serverless GPU instance."""

import sys

__version__ = "0.1.0"

# pip refuses to install pyworker on an older Python (requires-python); a clone run in place
# (Vast's start script runs `python3 -m workers.<name>.worker` in it) says so here instead of
# failing later on syntax or a missing standard-library name.
if sys.version_info < (3, 10):  # noqa: UP036 - the check is for Pythons ruff's target excludes
    raise SystemExit(
        f"pyworker needs Python 3.10 or newer; this is Python {sys.version.split()[0]}"
    )
