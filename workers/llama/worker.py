"""`python3 -m workers.llama.worker`: the OpenAI-compatible worker with llama-server's defaults.

Vast's start script runs this module in a clone of the repository. The worker itself is
pyworker/workers/llama (its README says what it serves and which variables it reads).
"""

from __future__ import annotations

from pyworker.workers.llama.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
