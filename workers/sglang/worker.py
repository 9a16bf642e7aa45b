"""`python3 -m workers.sglang.worker`: the OpenAI-compatible worker with SGLang's defaults.

Vast's start script runs this module in a clone of the repository. The worker itself is
pyworker/workers/sglang (its README says what it serves and which variables it reads).
"""

from __future__ import annotations

from pyworker.workers.sglang.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
