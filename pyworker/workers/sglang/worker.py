"""`BACKEND=sglang`: the OpenAI-compatible worker (../openai) with SGLang's defaults.

Its port, log file, model variable, health route and log lines are in ../openai/engines.py;
each can be overridden through the environment (see README.md in this folder).
"""

from __future__ import annotations

from pyworker.workers.openai.engines import ServerKind
from pyworker.workers.openai.worker import build_worker

worker = build_worker(kind=ServerKind.SGLANG)

if __name__ == "__main__":  # python -m pyworker.workers.sglang.worker
    from pyworker.entry import serve

    serve(worker)
