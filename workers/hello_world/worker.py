"""`python3 -m workers.hello_world.worker`: a worker in front of pyworker's demo server.

Vast's start script runs this module in a clone of the repository. The worker itself is
pyworker/workers/hello_world (its README says what it serves and which variables it reads).
"""

from __future__ import annotations

from pyworker.workers.hello_world.worker import worker

if __name__ == "__main__":
    from pyworker.entry import serve

    serve(worker)
