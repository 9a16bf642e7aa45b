"""The bodies workers and clients send to the autoscaler, validated.

Validation is deliberately strict on types (a NaN, a string where a number belongs, a missing
`id`): the local autoscaler is a test tool, and a malformed report is a bug to surface as a 400,
not to paper over. Unknown keys are kept, as newer workers may send more.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class WorkerReport(BaseModel):
    """`POST /worker_status/`; every field but `id` may be left out (start-up failure beacons)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    id: int
    mtoken: str | None = None
    version: str = ""
    loadtime: float = 0.0
    cur_load: float = 0.0
    new_load: float = 0.0
    rej_load: float = 0.0
    cur_perf: float = 0.0
    max_perf: float = 0.0
    error_msg: str | None = ""
    num_requests_working: int = 0
    num_requests_recieved: int = 0  # sic: the reference's spelling
    additional_disk_usage: float = 0.0
    working_request_idxs: list[int] = Field(default_factory=list)
    cur_capacity: float = 0.0
    max_capacity: float = 0.0
    url: str = ""


class FinishedItem(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    request_idx: int
    success: bool = True
    status: str = ""
    entered_queue_at: float | None = None
    work_started_at: float | None = None
    work_completed_at: float | None = None


class DeleteRequests(BaseModel):
    """`POST /delete_requests/`: the `requests` list, or the older `request_idxs` + `success`."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    worker_id: int
    mtoken: str | None = None
    requests: list[FinishedItem] | None = None
    request_idxs: list[int] | None = None
    success: bool = True

    @model_validator(mode="after")
    def _one_form(self) -> DeleteRequests:
        if self.requests is None and self.request_idxs is None:
            raise ValueError("either requests or request_idxs is required")
        return self


class RouteRequest(BaseModel):
    """`POST /route/` from a client; `request_idx` 0 or absent asks for a new one."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    endpoint: str
    api_key: str = ""
    cost: float = Field(default=0.0, ge=0)
    request_idx: int | None = None
    replay_timeout: float | None = None
