"""`python workers/openai/client.py`: pyworker/workers/openai/client.py, run from a clone.

Installed, the same script is `python -m pyworker.workers.openai.client`.
"""

from __future__ import annotations

from pyworker.workers.openai.client import main

if __name__ == "__main__":
    raise SystemExit(main())
