"""What a template author writes and what the process environment says, read once at start.

`pyworker.config` is the template author's import: the worker config models and the types of
its hooks (pyworker.config.worker), and the request bodies other than JSON that an encoder
returns (pyworker.config.encoded_body).
"""

from pyworker.config.encoded_body import BodyEncoder, BodyPart, EncodedBody, PayloadRefused
from pyworker.config.in_process import ModelLifecycle, RouteFunction, Setup
from pyworker.config.worker import (
    BenchmarkConfig,
    HandlerResult,
    JSONObject,
    LimitProbe,
    MiB,
    ModelHandler,
    ModelServerConfig,
    Pattern,
    PatternConfig,
    ProducedWork,
    RequestHook,
    ResponseHook,
    RouteConfig,
    SessionConfig,
    WorkerConfig,
    WorkloadFunction,
)

__all__ = [
    "BenchmarkConfig",
    "BodyEncoder",
    "BodyPart",
    "EncodedBody",
    "HandlerResult",
    "JSONObject",
    "LimitProbe",
    "MiB",
    "ModelHandler",
    "ModelLifecycle",
    "ModelServerConfig",
    "Pattern",
    "PatternConfig",
    "PayloadRefused",
    "ProducedWork",
    "RequestHook",
    "ResponseHook",
    "RouteConfig",
    "RouteFunction",
    "SessionConfig",
    "Setup",
    "WorkerConfig",
    "WorkloadFunction",
]
