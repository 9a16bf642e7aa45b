"""`python workers/tgi/client.py`: pyworker/workers/tgi/client.py, run from a clone.

Installed, the same script is `python -m pyworker.workers.tgi.client`.
"""

from __future__ import annotations

from pyworker.workers.tgi.client import main

if __name__ == "__main__":
    raise SystemExit(main())
