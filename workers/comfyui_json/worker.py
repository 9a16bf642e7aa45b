"""`python3 -m workers.comfyui_json.worker`: ComfyUI behind its API wrapper (`comfyui-json`).

Vast's start script runs this module in a clone of the repository. The worker itself is
pyworker/workers/comfyui_json (its README says what it serves and which variables it reads).
"""

from __future__ import annotations

from pyworker.workers.comfyui_json.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
