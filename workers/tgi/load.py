"""`python -m workers.tgi.load`: pyworker/workers/tgi/load.py, run from a clone.

Installed, the same script is `python -m pyworker.workers.tgi.load`.
"""

from __future__ import annotations

from pyworker.workers.tgi.load import main

if __name__ == "__main__":
    raise SystemExit(main())
