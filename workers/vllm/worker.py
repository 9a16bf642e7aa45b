"""`python3 -m workers.vllm.worker`: the OpenAI-compatible worker with vLLM's defaults.

Vast's start script runs this module in a clone of the repository. The worker itself is
pyworker/workers/vllm (its README says what it serves and which variables it reads).
"""

from __future__ import annotations

from pyworker.workers.vllm.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
