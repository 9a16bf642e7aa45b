"""`python workers/hello_world/client.py`: pyworker/workers/hello_world/client.py, run from a clone.

Installed, the same script is `python -m pyworker.workers.hello_world.client`.
"""

from __future__ import annotations

from pyworker.workers.hello_world.client import main

if __name__ == "__main__":
    raise SystemExit(main())
