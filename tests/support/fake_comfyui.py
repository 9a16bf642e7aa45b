"""A fake ComfyUI: its workflow API, one prompt at a time, and ComfyUI's real log lines.

    python -m tests.support.fake_comfyui --log FILE --output DIR [--load-after S]
                                         [--seconds-per-step S]

It prints `listening on http://127.0.0.1:PORT` once its port is open. Its log gets ComfyUI's
start-up lines at once and, `--load-after` seconds later, "Starting server" and "To see the
GUI go to: ..."; until then every route answers 503. The lines are real ComfyUI lines
(pyworker/workers/comfyui/README.md cites where each comes from).

API, as ComfyUI's: `POST /prompt {"prompt", "client_id"}` validates and queues a workflow
(`{"prompt_id", "number", "node_errors"}`, or 400 with ComfyUI's error shape); one executor
runs the queue in order, sampling `steps x latent pixels / 512²` x `--seconds-per-step`, and
writes a PNG for every SaveImage / PreviewImage node; `GET /history/{prompt_id}` is `{}` until
the prompt has run; `GET /view?filename&subfolder&type` serves the file; `GET /queue`,
`POST /queue {"delete"}`, `POST /interrupt`, `GET /system_stats`. An identical workflow is
answered from the cache without running again, as ComfyUI does.

A checkpoint named `*corrupt*` fails the prompt the way a truncated safetensors file does
(the "MetadataIncompleteBuffer" lines). `GET /control/stats` counts executions.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import struct
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

REFERENCE_PIXELS = 512 * 512
CACHE_SIZE = 64
OUTPUT_NODES = {"SaveImage": "output", "PreviewImage": "temp"}

# Start-up on a 12 GB RTX 3060, as in a real ComfyUI log.
STARTUP = (
    "Total VRAM 12288 MB, total RAM 31894 MB",
    "pytorch version: 2.5.1+cu124",
    "Set vram state to: NORMAL_VRAM",
    "Device: cuda:0 NVIDIA GeForce RTX 3060 : cudaMallocAsync",
    "Using pytorch cross attention",
    "[Prompt Server] web root: /opt/ComfyUI/web",
    "",
    "Import times for custom nodes:",
    "   0.0 seconds: /opt/ComfyUI/custom_nodes/websocket_image_save.py",
    "",
)
LISTENING = ("Starting server", "", "To see the GUI go to: http://127.0.0.1:{port}")
EXECUTING = (
    "Requested to load SDXLClipModel",
    "loaded completely 5398.50524597168 1560.802734375 True",
    "Requested to load SDXL",
    "loaded completely 5398.50512008667 4897.0483474731445 True",
)
CORRUPT_MESSAGE = "Error while deserializing header: MetadataIncompleteBuffer"
CORRUPT = (
    f"!!! Exception during processing!!! {CORRUPT_MESSAGE}",
    "Traceback (most recent call last):",
    '  File "/opt/ComfyUI/execution.py", line 151, in recursive_execute',
    "    output_data, output_ui = get_output_data(obj, input_data_all)",
    '  File "/opt/ComfyUI/nodes.py", line 516, in load_checkpoint',
    "    out = comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, "
    'output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))',
    '  File "/opt/ComfyUI/comfy/utils.py", line 14, in load_torch_file',
    "    sd = safetensors.torch.load_file(ckpt, device=device.type)",
    f"safetensors_rust.SafetensorError: {CORRUPT_MESSAGE}",
)


def png(seed: int, size: int = 8) -> bytes:
    """A small valid PNG, its colour taken from the seed."""
    red, green, blue = seed % 256, (seed // 256) % 256, (seed * 7) % 256
    row = b"\x00" + bytes((red, green, blue)) * size
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    pixels = zlib.compress(row * size)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@dataclass
class Job:
    prompt_id: str
    number: int
    prompt: dict[str, Any]
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)


class FakeComfyUI:
    def __init__(
        self, log_path: str, output: Path, load_after: float, seconds_per_step: float
    ) -> None:
        self.log_path = log_path
        self.output = output
        self.load_after = load_after
        self.seconds_per_step = seconds_per_step
        self.port = 0
        self.loaded = False
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.pending: dict[str, Job] = {}
        self.running: Job | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.numbers = 0
        self.files = 0
        self.executed = 0
        self.interrupted = 0

    def log(self, *lines: str) -> None:
        self.log_raw("".join(line + "\n" for line in lines))

    def log_raw(self, text: str) -> None:
        """Append as is: tqdm redraws its bar with a carriage return, not a new line."""
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(text)

    async def start(self) -> None:
        self.log(*STARTUP)
        await asyncio.sleep(self.load_after)
        self.loaded = True
        self.log(*(line.format(port=self.port) for line in LISTENING))
        while True:
            job = await self.queue.get()
            if self.pending.pop(job.prompt_id, None) is None:
                continue  # deleted from the queue
            self.running = job
            try:
                await self.execute(job)
            finally:
                self.running = None

    # --- running a prompt ----------------------------------------------------------------
    async def execute(self, job: Job) -> None:
        started = time.perf_counter()
        messages: list[list[Any]] = [
            ["execution_start", {"prompt_id": job.prompt_id, "timestamp": _now_ms()}]
        ]
        key = hashlib.sha256(json.dumps(job.prompt, sort_keys=True).encode()).hexdigest()
        outputs = self.cache.get(key)
        status = "success"
        if outputs is not None:
            messages.append(
                ["execution_cached", {"nodes": sorted(job.prompt), "prompt_id": job.prompt_id}]
            )
        elif any(
            "corrupt" in str(_inputs(node).get("ckpt_name", "")) for node in job.prompt.values()
        ):
            self.log(*CORRUPT)
            status, outputs = "error", {}
            messages.append(["execution_error", _corrupt_error(job)])
        else:
            self.log(*EXECUTING)
            outputs = await self.sample(job)
            if outputs is None:
                status, outputs = "error", {}
                messages.append(["execution_interrupted", {"prompt_id": job.prompt_id}])
                self.interrupted += 1
            else:
                self.cache[key] = outputs
                while len(self.cache) > CACHE_SIZE:
                    self.cache.popitem(last=False)
                self.executed += 1
        if status == "success":
            messages.append(
                ["execution_success", {"prompt_id": job.prompt_id, "timestamp": _now_ms()}]
            )
        self.log(f"Prompt executed in {time.perf_counter() - started:.2f} seconds")
        self.history[job.prompt_id] = {
            "prompt": [job.number, job.prompt_id, job.prompt, {}, _output_ids(job.prompt)],
            "outputs": outputs,
            "status": {
                "status_str": status,
                "completed": status == "success",
                "messages": messages,
            },
            "meta": {},
        }

    async def sample(self, job: Job) -> dict[str, Any] | None:
        """Sleep for the sampling work, with a tqdm bar per sampler; None if interrupted."""
        for node in job.prompt.values():
            inputs = _inputs(node)
            if "latent_image" not in inputs:
                continue
            steps = int(inputs.get("steps", 0))
            latent = _inputs(_linked(job.prompt, inputs["latent_image"]))
            pixels = int(latent.get("width", 512)) * int(latent.get("height", 512))
            pixels *= int(latent.get("batch_size", 1))
            self.log_raw(f"  0%|          | 0/{steps} [00:00<?, ?it/s]\r")
            seconds = steps * pixels / REFERENCE_PIXELS * self.seconds_per_step
            try:
                await asyncio.wait_for(job.interrupted.wait(), seconds)
                return None
            except asyncio.TimeoutError:
                pass
            rate = steps / seconds if seconds > 0 else 0.0
            self.log(f"100%|██████████| {steps}/{steps} [00:00<00:00, {rate:.2f}it/s]")
        self.log("Requested to load AutoencoderKL")
        return await asyncio.to_thread(self.save, job)

    def save(self, job: Job) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        for node_id, node in job.prompt.items():
            kind = OUTPUT_NODES.get(node.get("class_type", ""))
            if kind is None:
                continue
            self.files += 1
            prefix = str(_inputs(node).get("filename_prefix", "ComfyUI"))
            name = f"{prefix}_{self.files:05}_.png"
            folder = self.output / kind
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(png(self.files))
            outputs[node_id] = {"images": [{"filename": name, "subfolder": "", "type": kind}]}
        return outputs

    # --- the API -------------------------------------------------------------------------
    def app(self) -> web.Application:
        @web.middleware
        async def loading(request: web.Request, handler: Any) -> web.StreamResponse:
            if not self.loaded and not request.path.startswith("/control/"):
                return web.Response(status=503, text="starting")
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[loading])
        app.router.add_post("/prompt", self.submit)
        app.router.add_get("/history/{prompt_id}", self.history_of)
        app.router.add_get("/view", self.view)
        app.router.add_get("/queue", self.queue_state)
        app.router.add_post("/queue", self.queue_delete)
        app.router.add_post("/interrupt", self.interrupt)
        app.router.add_get("/system_stats", self.system_stats)
        app.router.add_get("/control/stats", self.stats)
        return app

    async def submit(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return _invalid("invalid_prompt", "Cannot execute because the prompt is not a dict.")
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return _invalid(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
        if not _output_ids(prompt):
            return _invalid("prompt_no_outputs", "Prompt has no outputs")
        self.log("got prompt")  # ComfyUI writes it on accepting the prompt
        self.numbers += 1
        job = Job(str(uuid.uuid4()), self.numbers, prompt)
        self.pending[job.prompt_id] = job
        self.queue.put_nowait(job)
        return web.json_response(
            {"prompt_id": job.prompt_id, "number": job.number, "node_errors": {}}
        )

    async def history_of(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def view(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("filename", "")
        kind = request.query.get("type", "output")
        if not name or "/" in name or ".." in name or kind not in ("output", "temp", "input"):
            return web.Response(status=400)
        path = self.output / kind / name
        if not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path, headers={"Content-Type": "image/png"})

    async def queue_state(self, request: web.Request) -> web.Response:
        def item(job: Job) -> list[Any]:
            return [job.number, job.prompt_id, job.prompt, {}, _output_ids(job.prompt)]

        running = [item(self.running)] if self.running is not None else []
        pending = [item(job) for job in self.pending.values()]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def queue_delete(self, request: web.Request) -> web.Response:
        body = await request.json()
        for prompt_id in body.get("delete", []):
            self.pending.pop(prompt_id, None)
        if body.get("clear"):
            self.pending.clear()
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        if self.running is not None and wanted in (None, self.running.prompt_id):
            self.running.interrupted.set()
        return web.Response(status=200)

    async def system_stats(self, request: web.Request) -> web.Response:
        mib = 1024 * 1024
        return web.json_response(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 31894 * mib,
                    "ram_free": 20000 * mib,
                    "comfyui_version": "0.3.7",
                    "python_version": "3.12.7",
                    "pytorch_version": "2.5.1+cu124",
                    "embedded_python": False,
                    "argv": ["main.py", "--listen", "127.0.0.1"],
                },
                "devices": [
                    {
                        "name": "cuda:0 NVIDIA GeForce RTX 3060 : cudaMallocAsync",
                        "type": "cuda",
                        "index": 0,
                        "vram_total": 12288 * mib,
                        "vram_free": 9000 * mib,
                        "torch_vram_total": 0,
                        "torch_vram_free": 0,
                    }
                ],
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "executed": self.executed,
                "interrupted": self.interrupted,
                "pending": len(self.pending),
            }
        )


def _inputs(node: object) -> dict[str, Any]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _linked(prompt: dict[str, Any], link: object) -> object:
    return prompt.get(str(link[0])) if isinstance(link, list) and link else None


def _output_ids(prompt: dict[str, Any]) -> list[str]:
    return [key for key, node in prompt.items() if node.get("class_type") in OUTPUT_NODES]


def _corrupt_error(job: Job) -> dict[str, Any]:
    node_id = next((key for key, node in job.prompt.items() if "ckpt_name" in _inputs(node)), "4")
    return {
        "prompt_id": job.prompt_id,
        "node_id": node_id,
        "node_type": job.prompt[node_id].get("class_type"),
        "executed": [],
        "exception_message": CORRUPT_MESSAGE,
        "exception_type": "safetensors_rust.SafetensorError",
        "traceback": [line + "\n" for line in CORRUPT[2:-1]],
        "current_inputs": {},
        "current_outputs": {},
    }


def _invalid(kind: str, message: str, details: str = "") -> web.Response:
    error = {"type": kind, "message": message, "details": details, "extra_info": {}}
    return web.json_response({"error": error, "node_errors": []}, status=400)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def main(arguments: argparse.Namespace) -> None:
    server = FakeComfyUI(
        arguments.log, Path(arguments.output), arguments.load_after, arguments.seconds_per_step
    )
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    print(f"listening on http://127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    running = asyncio.create_task(server.start())
    await stop.wait()
    running.cancel()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--load-after", type=float, default=1.0)
    parser.add_argument("--seconds-per-step", type=float, default=0.005)
    asyncio.run(main(parser.parse_args()))
