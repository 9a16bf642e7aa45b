"""The bodies workers and clients send to the autoscaler (pyworker.protocol.messages), validated.

Validation is deliberately strict on types (a NaN, a string where a number belongs, a missing
`id`): the local autoscaler is a test tool, and a malformed report is a bug to surface as a 400,
not to paper over. Unknown keys are ignored here; the autoscaler keeps the raw report too.
"""

from __future__ import annotations

from pydantic import ConfigDict, TypeAdapter
from pydantic.dataclasses import dataclass

from pyworker.protocol import messages

STRICT = ConfigDict(allow_inf_nan=False)
"""Applies to the nested items (`requests`) too."""


@dataclass(frozen=True, config=STRICT)
class WorkerReport(messages.WorkerStatusReport):
    """`POST /worker_status/`, validated."""


@dataclass(frozen=True, config=STRICT)
class DeleteRequests(messages.DeleteRequests):
    """`POST /delete_requests/`, validated, its items too."""


@dataclass(frozen=True, config=STRICT)
class RouteRequest(messages.RouteRequest):
    """`POST /route/`, validated."""


WORKER_REPORT = TypeAdapter(WorkerReport)
DELETE_REQUESTS = TypeAdapter(DeleteRequests)
ROUTE_REQUEST = TypeAdapter(RouteRequest)
