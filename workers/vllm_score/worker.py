"""`python3 -m workers.vllm_score.worker`: vLLM serving a reranker (`vllm-score`).

Vast's start script runs this module in a clone of the repository. The worker itself is
pyworker/workers/vllm_score (its README says what it serves and which variables it reads).
"""

from __future__ import annotations

from pyworker.workers.vllm_score.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
