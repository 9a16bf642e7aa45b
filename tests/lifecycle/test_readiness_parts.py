"""The parts of readiness: one name in the log, and the failure that errored the worker."""

from __future__ import annotations

import logging
import pkgutil
from importlib import import_module
from typing import Any

import pytest

from pyworker.config import WorkerConfig
from pyworker.config.environment import Environment
from pyworker.lifecycle import readiness
from pyworker.lifecycle.gpu import GpuMonitor
from pyworker.lifecycle.readiness import Readiness
from pyworker.lifecycle.state import LifecycleEvent, WorkerState, WorkerStatus
from pyworker.serving.compose import compose_worker
from tests.fakes.nvml import FakeNvml
from tests.support.states import advance


def test_every_part_logs_under_the_name_the_worker_log_has_always_shown() -> None:
    for module in pkgutil.iter_modules(readiness.__path__):
        logger: Any = getattr(import_module(f"{readiness.__name__}.{module.name}"), "logger", None)
        assert logger is None or logger.name == "pyworker.lifecycle.readiness", module.name


def _readiness() -> tuple[Readiness, WorkerStatus]:
    config = WorkerConfig.model_validate({"routes": [{"path": "/x"}], "perf": 5.0})
    worker = compose_worker(config, Environment.from_env({}), GpuMonitor(FakeNvml([])))
    return worker.readiness, worker.status


def test_the_first_error_stands_and_says_how_the_worker_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts, status = _readiness()
    advance(status, WorkerState.LOADING)
    with caplog.at_level(logging.ERROR, "pyworker.lifecycle.readiness"):
        parts.fail(LifecycleEvent.FATAL_LINE_SEEN, "model server error: CUDA out of memory")
        parts.fail(LifecycleEvent.LOAD_DEADLINE_PASSED, "the model did not load in time")
    assert status.state is WorkerState.ERRORED
    assert status.error_msg == "model server error: CUDA out of memory"
    assert parts.errored_by is LifecycleEvent.FATAL_LINE_SEEN
    assert [record.getMessage() for record in caplog.records] == [
        "model server error: CUDA out of memory",
        "the model did not load in time",
    ]  # both said in the log, as they happen


def test_an_in_process_load_failure_is_said_over_an_earlier_error() -> None:
    parts, status = _readiness()
    advance(status, WorkerState.LOADING)
    parts.fail(LifecycleEvent.LOAD_DEADLINE_PASSED, "the model did not load in time")
    parts.fail(LifecycleEvent.LOAD_FAILED, "lifecycle of model failed: RuntimeError: no GPU")
    assert status.error_msg == "lifecycle of model failed: RuntimeError: no GPU"
    assert parts.errored_by is LifecycleEvent.LOAD_FAILED


def test_a_failure_while_draining_is_recorded_and_the_state_stays() -> None:
    parts, status = _readiness()
    advance(status, WorkerState.DRAINING)
    parts.fail(LifecycleEvent.HEALTH_FAILED, "model server health check /health failing")
    assert status.state is WorkerState.DRAINING
    assert status.error_msg == "model server health check /health failing"
