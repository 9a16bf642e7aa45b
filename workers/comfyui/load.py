"""`python -m workers.comfyui.load`: pyworker/workers/comfyui/load.py, run from a clone.

Installed, the same script is `python -m pyworker.workers.comfyui.load`.
"""

from __future__ import annotations

from pyworker.workers.comfyui.load import main

if __name__ == "__main__":
    raise SystemExit(main())
