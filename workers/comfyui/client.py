"""`python workers/comfyui/client.py`: pyworker/workers/comfyui/client.py, run from a clone.

Installed, the same script is `python -m pyworker.workers.comfyui.client`.
"""

from __future__ import annotations

from pyworker.workers.comfyui.client import main

if __name__ == "__main__":
    raise SystemExit(main())
