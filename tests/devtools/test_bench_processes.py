"""bench/processes.py: `cores_apart` puts an engine on one core and what this process starts
after on another, and gives this process its cores back."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.processes import cores_apart

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


def test_the_engine_and_what_starts_after_run_on_cores_apart() -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to keep apart")
    engine = subprocess.Popen(SLEEPER)
    executor = ThreadPoolExecutor(1)  # a thread that exists before, as asyncio.to_thread's
    executor.submit(int).result()
    try:
        with cores_apart(engine.pid):
            assert os.sched_getaffinity(engine.pid) == {cores[0]}
            assert os.sched_getaffinity(0) == {cores[1]}
            front = executor.submit(subprocess.Popen, SLEEPER).result()
            try:
                assert os.sched_getaffinity(front.pid) == {cores[1]}
            finally:
                front.kill()
                front.wait()
        assert sorted(os.sched_getaffinity(0)) == cores
        # Given back on the way out of an error too.
        with pytest.raises(RuntimeError), cores_apart(engine.pid):
            raise RuntimeError("stop")
        assert sorted(os.sched_getaffinity(0)) == cores
        assert sorted(executor.submit(os.sched_getaffinity, 0).result()) == cores
    finally:
        executor.shutdown()
        engine.kill()
        engine.wait()
