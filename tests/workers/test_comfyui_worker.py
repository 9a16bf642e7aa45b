"""The `comfyui` worker and the route `handler` it needs.

Its workload rule on real workflows, its log patterns on real ComfyUI lines, its handler
against a fake ComfyUI in process (images, failures, a client that leaves), the handler hook
of the worker itself, and end to end: a fake ComfyUI process replaying ComfyUI's log,
`pyworker run comfyui`, and a recording autoscaler.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pyworker.config import HandlerResult, JSONObject
from pyworker.config.dataset import load_dataset
from pyworker.config.loader import load_config
from pyworker.lifecycle.logfollow import LineKind, LogFollower, LogPattern
from pyworker.lifecycle.readiness import log_patterns
from pyworker.workers.comfyui import worker as comfyui
from pyworker.workers.comfyui.worker import check_payload, run_workflow, workload
from tests.conftest import KeyPair, WorkerFactory, wait_until
from tests.support import fake_comfyui
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.fake_comfyui import FakeComfyUI
from tests.support.processes import spawn, stop

REPOSITORY = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def txt2img(
    steps: int = 20, width: int = 512, height: int = 512, batch: int = 1, seed: int = 1
) -> dict[str, Any]:
    """ComfyUI's default workflow in API format, as "Save (API Format)" exports it."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 8,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        },
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": batch},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
        },
    }


# --- config and workload ------------------------------------------------------------------
def test_the_config_loads_from_workers_comfyui_as_a_fifo_handler_route() -> None:
    config = load_config("comfyui", environ={"MODEL_LOG": "/var/log/comfyui.log"})
    (route,) = config.routes
    assert route.path == "/workflow" and route.fifo and route.concurrency_limit == 1
    assert route.handler is not None and route.request_hook is not None
    assert config.model_server.health_path == "/system_stats"
    assert config.model_server.readiness_source == "log"
    assert config.benchmark.route == "/workflow"


def test_workload_of_the_default_workflow_is_its_steps() -> None:
    assert workload({"workflow": txt2img()}) == 20
    assert workload({"prompt": txt2img(steps=30, width=1024, height=1024, batch=2)}) == 240
    assert (
        load_config("comfyui", environ={})
        .routes[0]
        .compute_workload({"workflow": txt2img(steps=8)}, cost=0)
        == 8
    )


def test_workload_follows_step_windows_schedulers_and_upscales() -> None:
    workflow = txt2img(steps=30, width=1024, height=1024)
    workflow["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {"steps": 30, "start_at_step": 0, "end_at_step": 20, "latent_image": ["5", 0]},
    }
    # Hires fix: upscale the first latent by 1.5 and sample it again for 10 steps.
    workflow["10"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["3", 0], "scale_by": 1.5},
    }
    workflow["11"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {"sigmas": ["12", 0], "latent_image": ["10", 0]},
    }
    workflow["12"] = {"class_type": "BasicScheduler", "inputs": {"steps": 10, "denoise": 0.5}}
    # The first pass: 20 steps at 4x the pixels; the second: 10 steps at 4 x 2.25.
    assert workload({"workflow": workflow}) == 20 * 4 + 10 * 4 * 2.25


def test_an_image_sized_latent_counts_as_512_and_odd_graphs_stay_finite() -> None:
    img2img = txt2img(steps=12)
    img2img["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 2]}}
    assert workload({"workflow": img2img}) == 12
    looped = txt2img()
    looped["5"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["5", 0], "scale_by": 1}}
    assert workload({"workflow": looped}) == 20
    assert workload({"workflow": {"1": {"class_type": "ImageScale", "inputs": {}}}}) == 1
    assert workload({}) == 1
    broken = txt2img(steps=20)
    broken["3"]["inputs"]["latent_image"] = "five"
    broken["3"]["inputs"]["steps"] = "20"
    assert workload({"workflow": broken}) == 1


def test_a_payload_that_is_no_workflow_is_refused_before_the_queue() -> None:
    assert check_payload({"prompt": txt2img()})
    assert check_payload({"workflow": txt2img(), "output": "paths"})
    refused: list[dict[str, Any]] = [
        {},
        {"workflow": {}},
        {"workflow": [txt2img()]},
        {"workflow": {"3": {"inputs": {}}}},
        {"workflow": {"3": {"class_type": "KSampler", "inputs": [1]}}},
        {"workflow": txt2img(), "output": "tiff"},
    ]
    for payload in refused:
        with pytest.raises(ValueError):
            check_payload(payload)


def test_the_shipped_dataset_samples_with_distinct_seeds() -> None:
    config = load_config("comfyui", environ={})
    payloads = load_dataset(config.benchmark)
    assert len(payloads) == 64  # more than the ramp sends one at a time within its budget
    seeds = {payload["workflow"]["3"]["inputs"]["seed"] for payload in payloads}
    assert len(seeds) == len(payloads)  # ComfyUI would answer a repeated workflow from cache
    assert all(check_payload(payload) and workload(payload) == 20 for payload in payloads)


# --- log patterns on real ComfyUI lines ---------------------------------------------------
def classify(line: str) -> LogPattern | None:
    config = load_config("comfyui", environ={})
    return LogFollower("unused.log", log_patterns(config)).classify(line)


def kind_of(line: str) -> LineKind | None:
    pattern = classify(line)
    return None if pattern is None else pattern.kind


def test_the_replayed_start_up_is_loaded_only_at_the_gui_line() -> None:
    lines = [*fake_comfyui.STARTUP, *fake_comfyui.LISTENING]
    kinds = [kind_of(line.format(port=8188)) for line in lines]
    assert kinds[-1] is LineKind.LOADED and kinds.count(LineKind.LOADED) == 1
    assert LineKind.ERROR not in kinds
    assert kind_of("To see the GUI go to: http://0.0.0.0:18188") is LineKind.LOADED


@pytest.mark.parametrize(
    "line",
    [
        "!!! Exception during processing!!! Error while deserializing header: "
        "MetadataIncompleteBuffer",
        "safetensors_rust.SafetensorError: Error while deserializing header: "
        "MetadataIncompleteBuffer",
        "AssertionError: Torch not compiled with CUDA enabled",
        "RuntimeError: Found no NVIDIA driver on your system. Please check that you have an "
        "NVIDIA GPU and installed a driver from http://www.nvidia.com/Download/index.aspx",
    ],
)
def test_a_broken_model_or_gpu_is_fatal(line: str) -> None:
    pattern = classify(line)
    assert pattern is not None and pattern.kind is LineKind.ERROR and pattern.fatal


@pytest.mark.parametrize(
    "line",
    [
        "!!! Exception during processing !!! Allocation on device ",
        "Got an OOM, unloading all loaded models.",
        "Failed to validate prompt for output 9:",
    ],
)
def test_one_failed_prompt_is_counted_but_not_fatal(line: str) -> None:
    pattern = classify(line)
    assert pattern is not None and pattern.kind is LineKind.ERROR and not pattern.fatal


def test_the_lines_of_a_normal_prompt_are_not_errors() -> None:
    lines = ["got prompt", *fake_comfyui.EXECUTING, "Prompt executed in 4.12 seconds"]
    assert LineKind.ERROR not in [kind_of(line) for line in lines]


# --- the handler against a fake ComfyUI in process ----------------------------------------
class Comfy:
    def __init__(self, fake: FakeComfyUI, server: TestServer, session: aiohttp.ClientSession):
        self.fake = fake
        self.server = server
        self.session = session

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def run(self, payload: JSONObject) -> tuple[int, dict[str, Any]]:
        result = await run_workflow(self.session, self.url, payload)
        assert result.content_type == "application/json"
        return result.status, json.loads(result.body)


@pytest.fixture
async def comfy(tmp_path: Path) -> AsyncIterator[Comfy]:
    fake = FakeComfyUI(str(tmp_path / "comfyui.log"), tmp_path / "output", 0.0, 0.002)
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    running = asyncio.create_task(fake.start())
    async with aiohttp.ClientSession() as session:
        await wait_until(lambda: fake.loaded)
        yield Comfy(fake, server, session)
    running.cancel()
    await server.close()


async def test_the_handler_answers_the_images_inline_or_as_paths(comfy: Comfy) -> None:
    status, answer = await comfy.run({"workflow": txt2img(seed=1)})
    assert status == 200 and answer["prompt_id"] and answer["seconds"] >= 0
    (image,) = answer["images"]
    assert image["node"] == "9" and image["type"] == "output" and image["kind"] == "images"
    assert image["view"] == f"/view?filename={image['filename']}&subfolder=&type=output"
    assert base64.b64decode(image["base64"]).startswith(PNG_SIGNATURE)
    assert image["content_type"] == "image/png"

    status, answer = await comfy.run({"workflow": txt2img(seed=2), "output": "paths"})
    assert status == 200 and "base64" not in answer["images"][0]
    async with comfy.session.get(comfy.url + answer["images"][0]["view"]) as response:
        assert (await response.read()).startswith(PNG_SIGNATURE)
    assert comfy.fake.executed == 2


async def test_images_beyond_the_inline_budget_are_answered_as_paths(
    comfy: Comfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    workflow = txt2img()
    workflow["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    size = len(fake_comfyui.png(1))
    monkeypatch.setattr(comfyui, "MAX_INLINE_BYTES", size + size // 2)
    status, answer = await comfy.run({"workflow": workflow})
    assert status == 200
    inlined = [image["base64"] is not None for image in answer["images"]]
    assert sorted(inlined) == [False, True]
    assert {image["type"] for image in answer["images"]} == {"output", "temp"}


async def test_comfyuis_validation_error_is_passed_through(comfy: Comfy) -> None:
    workflow = txt2img()
    del workflow["9"]
    status, answer = await comfy.run({"workflow": workflow})
    assert status == 400 and answer["error"]["type"] == "prompt_no_outputs"
    assert (await run_workflow(comfy.session, comfy.url, {"x": 1})).status == 422


async def test_a_failed_workflow_is_a_500_that_says_which_node_and_why(comfy: Comfy) -> None:
    workflow = txt2img()
    workflow["4"]["inputs"]["ckpt_name"] = "corrupt.safetensors"
    status, answer = await comfy.run({"workflow": workflow})
    assert status == 500 and answer["error"] == "workflow failed"
    assert answer["event"] == "execution_error" and answer["node_id"] == "4"
    assert answer["node_type"] == "CheckpointLoaderSimple"
    assert "MetadataIncompleteBuffer" in answer["exception_message"]


async def test_a_repeated_workflow_comes_from_comfyuis_cache(comfy: Comfy) -> None:
    first = await comfy.run({"workflow": txt2img(seed=5)})
    again = await comfy.run({"workflow": txt2img(seed=5)})
    assert first[1]["images"][0]["filename"] == again[1]["images"][0]["filename"]
    assert comfy.fake.executed == 1


# --- the route handler hook of the worker -------------------------------------------------
async def answer_text(
    session: aiohttp.ClientSession, base_url: str, payload: JSONObject
) -> HandlerResult:
    await asyncio.sleep(float(payload.get("seconds", 0)))
    return HandlerResult(201, f"got {payload['n']}".encode(), "text/plain; charset=utf-8")


async def call_closed_port(
    session: aiohttp.ClientSession, base_url: str, payload: JSONObject
) -> HandlerResult:
    async with session.get("http://127.0.0.1:1/") as response:
        return HandlerResult(response.status, await response.read())


async def test_a_route_handler_answers_instead_of_the_relay(
    start_worker: WorkerFactory, keypair: KeyPair
) -> None:
    routes = [
        {"path": "/custom", "handler": answer_text, "response_hook": lambda s, b: b + b"!"},
        {"path": "/slow", "handler": answer_text, "read_timeout": 0.2},
        {"path": "/down", "handler": call_closed_port},
    ]
    running = await start_worker(routes=routes)

    def envelope(payload: JSONObject, request_idx: int) -> JSONObject:
        return {"auth_data": keypair.auth_data(request_idx=request_idx), "payload": payload}

    async with running.post("/custom", envelope({"n": 7}, 1)) as response:
        assert response.status == 201 and await response.text() == "got 7!"
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    async with running.post("/slow", envelope({"n": 1, "seconds": 5}, 2)) as response:
        assert response.status == 504
    async with running.post("/down", envelope({}, 3)) as response:
        assert response.status == 502
        assert "unreachable" in (await response.json())["error"]
    await wait_until(lambda: running.worker.ledger.in_progress == 0)
    finished = {r.request_idx: r.status for r in running.worker.ledger.take_finished()}
    assert finished == {1: 201, 2: 504, 3: 502}


async def test_the_benchmark_runs_through_the_route_handler(
    start_worker: WorkerFactory, model_server: Any
) -> None:
    calls: list[JSONObject] = []

    async def counted(
        session: aiohttp.ClientSession, base_url: str, payload: JSONObject
    ) -> HandlerResult:
        calls.append(payload)
        assert base_url == model_server.url
        return HandlerResult(200, b"{}")

    running = await start_worker(
        routes=[{"path": "/run", "handler": counted, "workload": "units"}],
        perf=None,
        benchmark={"dataset": [{"units": 5}], "max_concurrency": 3},
    )
    assert len(calls) > 1  # the first answer, then the ramp
    assert running.worker.status.max_perf > 0
    assert model_server.recorder.payloads == []  # nothing was forwarded the plain way


async def test_a_client_that_leaves_interrupts_its_comfyui_prompt(
    start_worker: WorkerFactory, keypair: KeyPair, comfy: Comfy
) -> None:
    config = load_config("comfyui", environ={"MODEL_SERVER_URL": comfy.url})
    route = config.routes[0].model_dump() | {"read_timeout": 30.0}
    running = await start_worker(routes=[route], model_server={"base_url": comfy.url})
    envelope = {"auth_data": keypair.auth_data(), "payload": {"workflow": txt2img(steps=5000)}}

    async def send() -> None:
        async with running.post("/workflow", envelope) as response:
            await response.read()

    request = asyncio.create_task(send())
    await wait_until(lambda: comfy.fake.running is not None)
    request.cancel()  # the client hangs up while ComfyUI samples
    await wait_until(lambda: comfy.fake.interrupted == 1)
    await wait_until(lambda: running.worker.ledger.in_progress == 0)
    assert comfy.fake.running is None and comfy.fake.executed == 0


# --- end to end -----------------------------------------------------------------------------
async def _wait_report(
    autoscaler: FakeAutoscaler, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for report in autoscaler.worker_status:
            if predicate(report):
                return report
        await asyncio.sleep(0.02)
    raise AssertionError(f"no such report among {autoscaler.worker_status[-3:]}")


async def test_pyworker_run_comfyui_end_to_end(tmp_path: Path, keypair: KeyPair) -> None:
    log = tmp_path / "comfyui.log"
    async with FakeAutoscaler(keypair.pem) as autoscaler, aiohttp.ClientSession() as session:
        env = os.environ | {
            "REPORT_ADDR": autoscaler.url,
            "CONTAINER_ID": "9",
            "MASTER_TOKEN": "token",
            "UNSECURED": "false",
            "PYWORKER_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": str(REPOSITORY),
            "WORKER_HOST": "127.0.0.1",
        }
        model, model_url = await spawn(
            "-m", "tests.support.fake_comfyui", "--log", str(log),
            "--output", str(tmp_path / "output"), "--load-after", "0.5",
            "--seconds-per-step", "0.005", env=env,
        )  # fmt: skip
        worker, url = await spawn(
            "-m", "pyworker", "run", "comfyui", "--port", "0",
            env=env | {"MODEL_SERVER_URL": model_url, "MODEL_LOG": str(log)},
        )  # fmt: skip
        try:
            ready = await _wait_report(autoscaler, lambda r: r["max_perf"] > 0)
            assert autoscaler.worker_status[0]["max_perf"] == 0
            assert ready["error_msg"] == "" and ready["id"] == 9
            async with session.get(model_url + "/control/stats") as response:
                assert (await response.json())["executed"] > 1  # the first answer, the ramp

            def envelope(workflow: dict[str, Any], request_idx: int) -> dict[str, Any]:
                auth = keypair.auth_data(url, request_idx=request_idx)
                return {"auth_data": auth, "payload": {"workflow": workflow}}

            async with session.post(url + "/workflow", json=envelope(txt2img(seed=77), 201)) as r:
                assert r.status == 200
                answer = await r.json()
            assert base64.b64decode(answer["images"][0]["base64"]).startswith(PNG_SIGNATURE)

            # A corrupt checkpoint: the prompt fails, and the log line makes the worker errored.
            broken = copy.deepcopy(txt2img(seed=78))
            broken["4"]["inputs"]["ckpt_name"] = "corrupt.safetensors"
            async with session.post(url + "/workflow", json=envelope(broken, 202)) as r:
                assert r.status == 500
                assert "MetadataIncompleteBuffer" in (await r.json())["exception_message"]
            errored = await _wait_report(
                autoscaler, lambda r: "MetadataIncompleteBuffer" in r["error_msg"]
            )
            assert errored["max_perf"] == 0
            async with session.post(url + "/workflow", json=envelope(txt2img(), 203)) as r:
                assert r.status == 503
        finally:
            assert await stop(worker) == 0
            await stop(model)
