"""`python3 -m workers.comfyui.worker`: the ComfyUI workflow worker.

Vast's start script runs this module in a clone of the repository. The worker itself is
pyworker/workers/comfyui (its README says what it serves and which variables it reads).
"""

from __future__ import annotations

from pyworker.workers.comfyui.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
