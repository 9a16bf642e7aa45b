"""`BACKEND=comfyui-json`, run by Vast's start script as `python3 -m workers.comfyui-json.worker`.

The worker is defined in pyworker/workers/comfyui_json (a name Python can import);
this module only gives it the name Vast's templates use.
"""

from __future__ import annotations

from pyworker.workers.comfyui_json.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
