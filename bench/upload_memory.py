"""Peak memory of one large upload through the `openai` worker, measured with tracemalloc.

    python -m bench.upload_memory --mib 20

One process runs the worker (UNSECURED) and an engine that reads the multipart body a chunk
at a time and keeps only its length and hash; the client is `curl` in another process, so
neither the client's copy nor the engine's counts. The figures are Python allocations traced
while the request runs, above what was allocated before it; each is set against the sizes of
the upload (decoded) and of its envelope (base64 in JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import os
import shutil
import sys
import tempfile
import tracemalloc
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from pyworker.config.environment import Environment
from pyworker.serving.compose import compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from pyworker.workers.openai.routes import TRANSCRIPTIONS
from pyworker.workers.openai.uploads import UploadForm
from pyworker.workers.openai.worker import build_worker

MiB = 1024 * 1024


class Engine:
    """Reads the upload off the socket and keeps its size and hash, never the bytes."""

    def __init__(self) -> None:
        self.length = 0
        self.digest = ""

    async def transcribe(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        digest = hashlib.sha256()
        while (part := await reader.next()) is not None:
            if getattr(part, "filename", None):
                while chunk := await part.read_chunk(MiB):  # type: ignore[union-attr]
                    digest.update(chunk)
                    self.length += len(chunk)
            else:
                await part.release()
        self.digest = digest.hexdigest()
        return web.json_response({"text": "ok"})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")


async def measure(mib: int) -> dict[str, float]:
    upload = os.urandom(mib * MiB)
    auth = {"cost": 1, "endpoint": "t", "reqnum": 1, "request_idx": 1, "signature": "", "url": ""}
    envelope = orjson.dumps(
        {"auth_data": auth, "payload": {"file": base64.b64encode(upload).decode()}}
    )
    folder = Path(tempfile.mkdtemp())
    body_file = folder / "envelope.json"
    body_file.write_bytes(envelope)
    expected = hashlib.sha256(upload).hexdigest()
    del upload

    engine = Engine()
    app = web.Application(client_max_size=4 * mib * MiB)
    app.router.add_post(TRANSCRIPTIONS, engine.transcribe)
    app.router.add_get("/health", engine.health)
    engine_server = TestServer(app, host="127.0.0.1")
    await engine_server.start_server()

    config = build_worker({"OPENAI_ROUTES": f"/v1/completions,{TRANSCRIPTIONS}"})
    server_config = config.model_server.model_copy(
        update={"base_url": str(engine_server.make_url("")).rstrip("/")}
    )
    config = config.model_copy(update={"model_server": server_config, "perf": 1000.0})
    environment = Environment.from_env({"UNSECURED": "true", "REPORT_ADDR": "http://127.0.0.1:9"})
    worker = compose_worker(config, environment)
    worker.reporter.addresses = ()
    worker_server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
    await worker_server.start_server()
    while not worker.status.ready:
        await asyncio.sleep(0.05)

    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline, _ = tracemalloc.get_traced_memory()
    url = str(worker_server.make_url(TRANSCRIPTIONS))
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
        "Content-Type: application/json", "--data-binary", f"@{body_file}", url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    status, _ = await curl.communicate()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # The encoder alone, on a payload already parsed: what decoding adds.
    payload = orjson.loads(envelope)["payload"]
    route = next(route for route in config.routes if route.path == TRANSCRIPTIONS)
    assert isinstance(route.body_encoder, UploadForm)
    gc.collect()
    tracemalloc.start()
    encoded = route.body_encoder.encode(payload)
    _, encoder_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del encoded

    await worker_server.close()
    await engine_server.close()
    shutil.rmtree(folder)
    assert status == b"200", status
    assert engine.length == mib * MiB and engine.digest == expected, "the upload changed"
    return {
        "upload_mib": mib,
        "envelope_mib": len(envelope) / MiB,
        "request_peak_mib": (peak - baseline) / MiB,
        "encoder_peak_mib": encoder_peak / MiB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=20, help="the upload's size (default 20)")
    arguments = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is needed: the client runs in its own process")
    figures = asyncio.run(measure(arguments.mib))
    print(
        f"upload {figures['upload_mib']} MiB, envelope {figures['envelope_mib']:.1f} MiB: "
        f"peak during the request {figures['request_peak_mib']:.1f} MiB above the baseline; "
        f"the encoder alone {figures['encoder_peak_mib']:.1f} MiB"
    )


if __name__ == "__main__":
    main()
