"""`python3 -m workers.textgen.worker`: an in-process text generator (no model server).

Vast's start script runs this module in a clone of the repository. Its worker is
pyworker/workers/textgen (whose README says what it serves and which variables it reads):
run, this module runs that one as `__main__`, as if it had been run itself, and it serves.
"""

from __future__ import annotations

if __name__ == "__main__":
    import runpy

    runpy.run_module("pyworker.workers.textgen.worker", run_name="__main__")
else:  # imported: `pyworker run textgen` in a clone reads the config from here
    from pyworker.workers.textgen.worker import worker as worker
