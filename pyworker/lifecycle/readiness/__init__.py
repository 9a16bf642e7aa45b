"""Driving the worker through its states: STARTING → LOADING → BENCHMARKING → READY.

Ready means: the model is loaded (its load line seen in the log, or, for servers without a
useful log, its health path answering), the benchmark done (or its cached result valid for
these GPUs and this model), the health path answering 200 when one is configured, and the
public key loaded unless unsecured (a worker that cannot get it is ERRORED, saying so, until
it arrives). A fatal error line or a failing health check makes the worker ERRORED with an
`error_msg` that says why; when the model server comes back (its load line again, or its
health recovering) the worker goes through readiness again. A pass that failed (the
benchmark, say) is also tried again after a backoff, the worker errored meanwhile. A model
that gives no load signal within its load deadline (pyworker.config.load_deadline) makes the
worker ERRORED too, until it loads. A model loaded in the worker's own process
(pyworker.lifecycle.in_process) is loaded when its lifecycle is entered; its failure to load
is the worker's error.

Each part says what it saw as a `LifecycleEvent`, and the table in
pyworker.lifecycle.state decides the state: `loading` (the log, the health route as a load
signal, the in-process lifecycle, the load deadline), `benchmarking` (the benchmark and its
cache, with GPU sampling), `health` (the watch while ready), and `coordinator`, which runs the
readiness passes, retries them, and recovers. They log under this package's one name.
"""

from pyworker.lifecycle.readiness.coordinator import Readiness
from pyworker.lifecycle.readiness.health import probe_health
from pyworker.lifecycle.readiness.loading import log_patterns

__all__ = ["Readiness", "log_patterns", "probe_health"]
