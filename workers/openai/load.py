"""`python -m workers.openai.load`: pyworker/workers/openai/load.py, run from a clone.

Installed, the same script is `python -m pyworker.workers.openai.load`.
"""

from __future__ import annotations

from pyworker.workers.openai.load import main

if __name__ == "__main__":
    raise SystemExit(main())
