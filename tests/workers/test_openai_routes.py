"""The `openai` worker's routes end to end: a worker and a recording fake engine on loopback.

What the engine receives (JSON as sent, uploads as multipart with their bytes intact), what the
client gets back (JSON, SSE, audio bytes, text, the engine's own errors), the upload bounds,
and which route the benchmark measures (and what the autoscaler hears when it cannot).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pyworker.config.environment import Environment
from pyworker.config.loader import ConfigError
from pyworker.serving.compose import Worker, compose_worker
from pyworker.serving.server import RUNNER_OPTIONS
from pyworker.workers.openai.benchmarks import wav_clip
from pyworker.workers.openai.routes import (
    ALL_ROUTES,
    EMBEDDINGS,
    IMAGE_EDITS,
    IMAGE_GENERATIONS,
    IMAGE_VARIATIONS,
    SPEECH,
    TRANSCRIPTIONS,
    TRANSLATIONS,
)
from pyworker.workers.openai.worker import build_worker
from tests.conftest import KeyPair, wait_until
from tests.support.fake_autoscaler import FakeAutoscaler
from tests.support.fake_openai import NOT_FOUND_BODY, FakeOpenAI, speech_bytes

REPOSITORY = Path(__file__).resolve().parents[2]
ALL_BYTES = bytes(range(256)) * 4
"""A file with every byte value, CR and LF among them: what a multipart encoder may not mangle."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Running:
    def __init__(
        self, worker: Worker, server: TestServer, session: aiohttp.ClientSession, keypair: KeyPair
    ) -> None:
        self.worker = worker
        self.server = server
        self.session = session
        self.keypair = keypair

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def post(self, path: str, payload: Any) -> Any:
        body = {"auth_data": self.keypair.auth_data(), "payload": payload}
        return self.session.post(self.url + path, json=body)


class Harness:
    """Starts `openai` workers (built from an environment, as in production) against the fake."""

    def __init__(self, engine: FakeOpenAI, engine_url: str, autoscaler: FakeAutoscaler) -> None:
        self.engine = engine
        self.engine_url = engine_url
        self.autoscaler = autoscaler
        self.started: list[tuple[TestServer, aiohttp.ClientSession, Worker]] = []

    async def start(
        self,
        keypair: KeyPair,
        environ: Mapping[str, str] | None = None,
        perf: float | None = 1000.0,
        wait_ready: bool = True,
    ) -> Running:
        config = build_worker({"OPENAI_SERVER": "vllm", **(environ or {})})
        server_config = config.model_server.model_copy(update={"base_url": self.engine_url})
        # A short benchmark budget: these tests are about what the ramp sends, not its figure
        # (the default minute, with a loaded machine's flat steps, outlasts the wait below).
        benchmark = config.benchmark.model_copy(update={"max_seconds": 5.0})
        config = config.model_copy(
            update={"model_server": server_config, "perf": perf, "benchmark": benchmark}
        )
        environment = Environment.from_env(
            {
                "REPORT_ADDR": self.autoscaler.url,
                "UNSECURED": "false",
                "CONTAINER_ID": "7",
                # The public address KeyPair.auth_data signs by default: signatures bind to it.
                "PUBLIC_IPADDR": "127.0.0.1",
                "VAST_TCP_PORT_3000": "1",
            }
        )
        worker = compose_worker(config, environment)
        server = TestServer(worker.create_app(), host="127.0.0.1", **RUNNER_OPTIONS)
        await server.start_server()
        session = aiohttp.ClientSession()
        self.started.append((server, session, worker))
        if wait_ready:
            await wait_until(lambda: worker.status.ready, timeout=30)
        return Running(worker, server, session, keypair)

    async def close(self) -> None:
        for server, session, _ in self.started:
            await session.close()
            await server.close()


@pytest.fixture
async def engine() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def harness(engine: tuple[FakeOpenAI, str], keypair: KeyPair) -> AsyncIterator[Harness]:
    async with FakeAutoscaler(keypair.pem) as autoscaler:
        made = Harness(engine[0], engine[1], autoscaler)
        yield made
        await made.close()


# --- JSON routes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        (EMBEDDINGS, {"model": "m", "input": ["one two", "three"]}),
        (IMAGE_GENERATIONS, {"prompt": "a red fox", "size": "512x512", "n": 2}),
    ],
)
async def test_json_routes_reach_the_engine_as_sent(
    harness: Harness, keypair: KeyPair, path: str, payload: dict[str, Any]
) -> None:
    running = await harness.start(keypair)
    async with running.post(path, payload) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        answer = await response.json()
    (received,) = harness.engine.received
    assert (received.path, received.content_type, received.json) == (
        path,
        "application/json",
        payload,
    )
    if path == EMBEDDINGS:
        assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        assert len(answer["data"]) == 2


@pytest.mark.parametrize(
    ("path", "request_"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 3}),
        (EMBEDDINGS, {"input": "text to embed"}),
        (TRANSCRIPTIONS, {"file": b64(b"RIFF"), "language": "en"}),
    ],
)
async def test_a_request_wrapped_in_input_is_unwrapped(
    harness: Harness, keypair: KeyPair, path: str, request_: dict[str, Any]
) -> None:
    running = await harness.start(keypair)
    async with running.post(path, {"input": request_}) as response:
        assert response.status == 200
    (received,) = harness.engine.received
    if received.json is not None:
        assert received.json == request_
    else:
        assert received.fields() == {"language": ["en"]}
        assert received.files("file")[0].data == b"RIFF"


async def test_a_stream_is_relayed_as_events(harness: Harness, keypair: KeyPair) -> None:
    running = await harness.start(keypair)
    payload = {"prompt": "hi", "max_tokens": 3, "stream": True}
    async with running.post("/v1/completions", payload) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        text = await response.text()
    assert text.count("data: ") == 5 and text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("response_format", "content_type"), [("wav", "audio/wav"), ("mp3", "audio/mpeg")]
)
async def test_speech_comes_back_byte_for_byte_with_its_content_type(
    harness: Harness, keypair: KeyPair, response_format: str, content_type: str
) -> None:
    running = await harness.start(keypair)
    payload = {"model": "tts", "input": "Hello there.", "voice": "alloy"}
    async with running.post(SPEECH, payload | {"response_format": response_format}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == content_type
        assert await response.read() == speech_bytes("Hello there.")


async def test_long_speech_is_streamed_through_byte_for_byte(
    harness: Harness, keypair: KeyPair
) -> None:
    running = await harness.start(keypair)
    payload = {"input": "Hello there.", "seconds": 300}  # 9.6 MB of audio
    async with running.post(SPEECH, payload) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "audio/wav"
        audio = await response.read()
    one = speech_bytes("Hello there.")
    assert len(audio) > 8 * 1024 * 1024 and audio == one * (len(audio) // len(one))


# --- uploads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [TRANSCRIPTIONS, TRANSLATIONS])
async def test_an_audio_upload_reaches_the_engine_as_a_file_part(
    harness: Harness, keypair: KeyPair, path: str
) -> None:
    running = await harness.start(keypair, {"OPENAI_MODEL": "whisper"})
    payload = {
        "file": b64(ALL_BYTES),
        "filename": "../secret/clip.mp3",
        "language": "en",
        "temperature": 0.2,
        "timestamp_granularities[]": ["word", "segment"],
        "prompt": 'quotes " and\r\nnewlines',
    }
    async with running.post(path, payload) as response:
        assert response.status == 200
        assert await response.json() == {"text": f"heard {len(ALL_BYTES)} bytes"}
    (received,) = harness.engine.on(path)
    assert received.content_type.startswith("multipart/form-data; boundary=")
    (part,) = received.files("file")
    assert (part.filename, part.content_type, part.data) == ("clip.mp3", "audio/mpeg", ALL_BYTES)
    assert received.fields() == {
        "model": ["whisper"],  # the served model, as the payload named none
        "language": ["en"],
        "temperature": ["0.2"],
        "timestamp_granularities[]": ["word", "segment"],
        "prompt": ['quotes " and\r\nnewlines'],
    }


async def test_a_text_answer_to_an_upload_is_relayed_as_text(
    harness: Harness, keypair: KeyPair
) -> None:
    running = await harness.start(keypair)
    payload = {"file": "data:audio/wav;base64," + b64(b"RIFF...."), "response_format": "text"}
    async with running.post(TRANSCRIPTIONS, payload) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        assert await response.text() == "heard 8 bytes"
    (part,) = harness.engine.received[0].files("file")
    assert (part.filename, part.content_type) == ("audio.wav", "audio/wav")


async def test_image_edits_send_every_image_and_the_mask(
    harness: Harness, keypair: KeyPair
) -> None:
    running = await harness.start(keypair)
    images = [b"\x89PNG first" + ALL_BYTES, b"\xff\xd8 second jpeg"]
    payload = {
        "image": [b64(image) for image in images],
        "filename": ["a.png", "b.jpg"],
        "mask": b64(b"\x89PNG mask"),
        "mask_filename": "mask.png",
        "prompt": "add a hat",
        "n": 1,
    }
    async with running.post(IMAGE_EDITS, payload) as response:
        assert response.status == 200
        assert (await response.json())["data"][0]["b64_json"]
    (received,) = harness.engine.received
    sent = [(part.filename, part.content_type, part.data) for part in received.files("image")]
    assert sent == [("a.png", "image/png", images[0]), ("b.jpg", "image/jpeg", images[1])]
    (mask,) = received.files("mask")
    assert (mask.filename, mask.data) == ("mask.png", b"\x89PNG mask")
    assert received.fields() == {"prompt": ["add a hat"], "n": ["1"]}


async def test_an_image_edit_may_name_a_url_instead_of_an_upload(
    harness: Harness, keypair: KeyPair
) -> None:
    running = await harness.start(keypair)
    payload = {"url": "https://example.com/cat.png", "prompt": "add a hat"}
    async with running.post(IMAGE_EDITS, payload) as response:
        assert response.status == 200
    (received,) = harness.engine.received
    assert received.files("image") == []
    assert received.fields() == {"url": ["https://example.com/cat.png"], "prompt": ["add a hat"]}
    async with running.post(IMAGE_EDITS, {"prompt": "add a hat"}) as response:
        assert response.status == 422
        assert "(or url)" in (await response.json())["image"]
    assert len(harness.engine.received) == 1


async def test_image_variations_send_one_image(harness: Harness, keypair: KeyPair) -> None:
    running = await harness.start(keypair)
    payload = {"image": b64(b"\x89PNG only"), "n": 2, "size": "256x256"}
    async with running.post(IMAGE_VARIATIONS, payload) as response:
        assert response.status == 200
    (part,) = harness.engine.received[0].files("image")
    assert (part.filename, part.content_type, part.data) == (
        "image.png",
        "image/png",
        b"\x89PNG only",
    )


async def test_a_20_mib_upload_arrives_whole(harness: Harness, keypair: KeyPair) -> None:
    running = await harness.start(keypair)
    audio = os.urandom(20 * 1024 * 1024)
    async with running.post(TRANSCRIPTIONS, {"file": b64(audio)}) as response:
        assert response.status == 200
        assert await response.json() == {"text": f"heard {len(audio)} bytes"}
    (part,) = harness.engine.received[0].files("file")
    assert hashlib.sha256(part.data).digest() == hashlib.sha256(audio).digest()


LIMITS = {"OPENAI_MAX_FILE_BYTES": "1000", "OPENAI_MAX_REQUEST_FILE_BYTES": "2500"}


@pytest.mark.parametrize(
    ("path", "payload", "status", "field", "says"),
    [
        (TRANSCRIPTIONS, {"file": "not base64!"}, 422, "file", "not valid base64"),
        (TRANSCRIPTIONS, {"file": "QUJD\u00e9"}, 422, "file", "not valid base64"),
        (TRANSCRIPTIONS, {"file": "QUJDR"}, 422, "file", "not valid base64"),
        (TRANSCRIPTIONS, {"file": 12}, 422, "file", "must be a base64 string"),
        (TRANSCRIPTIONS, {"file": ["QUJD"]}, 422, "file", "must be a base64 string"),
        (TRANSCRIPTIONS, {"language": "en"}, 422, "file", "missing"),
        (TRANSCRIPTIONS, {"file": "QUJD", "filename": "x.exe"}, 422, "filename", "'exe'"),
        (TRANSCRIPTIONS, {"file": b64(bytes(1001))}, 413, "file", "over 1000 bytes"),
        (IMAGE_EDITS, {"image": ["QUJD", 5]}, 422, "image.1", "must be a base64 string"),
        (
            IMAGE_EDITS,
            {"image": [b64(bytes(10)), b64(bytes(1200))]},
            413,
            "image.1",
            "over 1000 bytes",
        ),
        (
            IMAGE_EDITS,
            {"image": [b64(bytes(900))] * 2, "mask": b64(bytes(900))},
            413,
            "mask",
            "over 2500 bytes in all",
        ),
        (IMAGE_VARIATIONS, {"image": [b64(bytes(3))]}, 422, "image", "must be a base64 string"),
    ],
)
async def test_bad_uploads_are_refused_naming_the_field_and_nothing_is_sent(
    harness: Harness,
    keypair: KeyPair,
    path: str,
    payload: dict[str, Any],
    status: int,
    field: str,
    says: str,
) -> None:
    running = await harness.start(keypair, LIMITS)
    async with running.post(path, payload) as response:
        assert response.status == status
        body = await response.json()
    assert says in body[field], body
    assert harness.engine.received == []
    # The worker keeps serving, and the exact limit is allowed.
    async with running.post(path, _good_upload(path, 1000)) as response:
        assert response.status == 200
    assert [item.path for item in harness.engine.received] == [path]


def _good_upload(path: str, size: int) -> dict[str, Any]:
    if path == TRANSCRIPTIONS:
        return {"file": b64(bytes(size))}
    if path == IMAGE_EDITS:
        return {"image": [b64(bytes(size))], "mask": b64(bytes(size))}
    return {"image": b64(bytes(size))}


async def test_an_envelope_too_large_for_the_request_limit_is_refused_before_parsing(
    harness: Harness, keypair: KeyPair
) -> None:
    running = await harness.start(keypair, LIMITS)
    assert running.worker.config.max_body_size < 2 * 1024 * 1024
    async with running.post(TRANSCRIPTIONS, {"file": b64(bytes(2 * 1024 * 1024))}) as response:
        assert response.status == 413
    assert harness.engine.received == []


# --- the engine's own errors ------------------------------------------------------------------
async def test_an_engine_error_to_an_upload_reaches_the_client(
    harness: Harness, keypair: KeyPair
) -> None:
    error = b'{"error": {"message": "could not decode the audio", "code": 400}}'
    harness.engine.failures[TRANSCRIPTIONS] = (400, error, "application/json")
    running = await harness.start(keypair)
    async with running.post(TRANSCRIPTIONS, {"file": b64(b"garbage")}) as response:
        assert response.status == 400
        assert await response.read() == error


async def test_a_route_the_model_does_not_serve_answers_the_engines_error(
    harness: Harness, keypair: KeyPair
) -> None:
    harness.engine.unserved = {EMBEDDINGS, IMAGE_EDITS}
    running = await harness.start(keypair)
    async with running.post(EMBEDDINGS, {"input": "hi"}) as response:
        assert response.status == 404
        assert await response.json() == NOT_FOUND_BODY
    async with running.post(IMAGE_EDITS, {"image": b64(b"png")}) as response:
        assert response.status == 404
        assert await response.json() == NOT_FOUND_BODY


# --- which routes, which benchmark ------------------------------------------------------------
async def test_openai_routes_narrows_what_is_served(harness: Harness, keypair: KeyPair) -> None:
    environ = {"OPENAI_ROUTES": f"{EMBEDDINGS}, {SPEECH}", "BENCHMARK_ROUTE": EMBEDDINGS}
    running = await harness.start(keypair, environ)
    assert [route.path for route in running.worker.config.routes] == [EMBEDDINGS, SPEECH]
    async with running.post("/v1/completions", {"prompt": "hi"}) as response:
        assert response.status == 404
    async with running.post(EMBEDDINGS, {"input": "hi"}) as response:
        assert response.status == 200
    assert [item.path for item in harness.engine.received] == [EMBEDDINGS]


def test_every_route_is_served_by_default() -> None:
    assert [route.path for route in build_worker({}).routes] == list(ALL_ROUTES)
    assert build_worker({}).benchmark.route == "/v1/completions"


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"OPENAI_ROUTES": EMBEDDINGS}, "does not include the benchmark route /v1/completions"),
        ({"OPENAI_ROUTES": "/v1/completions,/v1/nope"}, "OPENAI_ROUTES names /v1/nope"),
        ({"BENCHMARK_ROUTE": "/v1/models"}, "BENCHMARK_ROUTE='/v1/models' is not a route"),
        ({"OPENAI_MAX_FILE_BYTES": "lots"}, "OPENAI_MAX_FILE_BYTES='lots'"),
    ],
)
def test_a_route_choice_that_cannot_be_served_is_a_start_up_error(
    environ: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        build_worker(environ)
    assert says in str(raised.value)


@pytest.mark.parametrize(
    "module", [["-m", "workers.openai.worker"], ["-m", "pyworker", "run", "openai"]]
)
def test_the_start_up_error_exits_2_naming_the_variable(module: list[str]) -> None:
    environ = os.environ | {"OPENAI_ROUTES": EMBEDDINGS, "PYTHONPATH": str(REPOSITORY)}
    done = subprocess.run(
        [sys.executable, *module], env=environ, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert b"OPENAI_ROUTES does not include the benchmark route" in done.stderr
    assert b"Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("route", "check"),
    [
        (EMBEDDINGS, "input"),
        (SPEECH, "input"),
        (TRANSCRIPTIONS, "file"),
        (TRANSLATIONS, "file"),
        (IMAGE_GENERATIONS, "prompt"),
        (IMAGE_EDITS, "image"),
        (IMAGE_VARIATIONS, "image"),
        ("/v1/chat/completions", "messages"),
    ],
)
async def test_the_benchmark_measures_the_chosen_route(
    harness: Harness, keypair: KeyPair, route: str, check: str
) -> None:
    await harness.start(keypair, {"BENCHMARK_ROUTE": route, "OPENAI_MODEL": "served"}, perf=None)
    received = harness.engine.on(route)
    assert received and len(received) == len(harness.engine.received)
    assert len(received) > 1  # the first answer, then the ramp
    first = received[0]
    if first.json is not None:
        assert check in first.json and first.json["model"] == "served"
        # vLLM (the default engine) makes a chat answer as long as asked; other routes have
        # no end of sequence to ignore.
        assert first.json.get("ignore_eos") is (True if check == "messages" else None)
    else:
        assert first.files(check) and first.fields()["model"] == ["served"]
        if route in (TRANSCRIPTIONS, TRANSLATIONS):
            assert first.files("file")[0].data[:4] == b"RIFF"
    report = await _report(harness.autoscaler, lambda r: r["max_perf"] > 0)
    assert report["error_msg"] == ""


async def test_the_speech_benchmark_names_the_voice_it_is_told(
    harness: Harness, keypair: KeyPair
) -> None:
    environ = {"BENCHMARK_ROUTE": SPEECH, "BENCHMARK_SPEECH_VOICE": "af_heart"}
    await harness.start(keypair, environ, perf=None)
    voices = {item.json.get("voice") for item in harness.engine.on(SPEECH)}
    assert voices == {"af_heart"}


async def test_embeddings_perf_is_tokens_from_usage(harness: Harness, keypair: KeyPair) -> None:
    running = await harness.start(keypair, {"BENCHMARK_ROUTE": EMBEDDINGS}, perf=None)
    result = running.worker.readiness.benchmark
    # The fake counts words as tokens: every answer's `usage` is the work, not the estimate.
    assert result is not None and result.counted == "produced work (from every answer)"
    assert result.perf > 0


async def test_a_benchmark_route_the_model_does_not_serve_keeps_the_worker_from_ready(
    harness: Harness, keypair: KeyPair
) -> None:
    harness.engine.unserved = {TRANSCRIPTIONS}
    running = await harness.start(
        keypair, {"BENCHMARK_ROUTE": TRANSCRIPTIONS}, perf=None, wait_ready=False
    )
    report = await _report(harness.autoscaler, lambda r: bool(r["error_msg"]))
    message = report["error_msg"]
    assert "/v1/audio/transcriptions" in message and "BENCHMARK_ROUTE" in message
    assert "HTTP 404" in message and "Not Found" in message
    assert report["max_perf"] == 0
    assert not running.worker.status.ready


async def _report(
    autoscaler: FakeAutoscaler, predicate: Any, timeout: float = 30.0
) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [report for report in autoscaler.worker_status if predicate(report)]
        return bool(found)

    await wait_until(seen, timeout=timeout)
    return found[0]


# --- workload ---------------------------------------------------------------------------------
def test_each_route_weighs_its_own_unit() -> None:
    routes = {route.path: route for route in build_worker({}).routes}

    def weigh(path: str, payload: dict[str, Any]) -> float:
        return routes[path].compute_workload(payload, cost=0)

    assert weigh(EMBEDDINGS, {"input": "a" * 400}) == 100  # 4 characters a token
    assert weigh(EMBEDDINGS, {"input": ["abcd", "abcdefgh", [1, 2, 3]]}) == 1 + 2 + 3
    assert weigh(EMBEDDINGS, {"input": [5, 6, 7, 8]}) == 4  # token ids
    assert weigh(SPEECH, {"input": "x" * 150}) == 10 * 50  # 10 s of speech, 50 a second
    ten_seconds = b64(wav_clip(1, seconds=10.0))
    assert weigh(TRANSCRIPTIONS, {"file": ten_seconds}) == pytest.approx(500, abs=1)
    mp3 = b64(bytes(16_000 * 6))  # 6 s at 128 kbit/s
    assert weigh(TRANSLATIONS, {"file": mp3, "filename": "a.mp3"}) == 300
    assert weigh(IMAGE_GENERATIONS, {"prompt": "p"}) == 4096
    assert weigh(IMAGE_GENERATIONS, {"size": "512x512", "n": 2}) == 2048
    assert weigh(IMAGE_EDITS, {"size": "auto", "n": "x"}) == 4096


# --- large envelopes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tail", [b', "temperature": NaN}}', b', "prompt": "\xff\xfe"}}', b', "x": }}']
)
async def test_a_large_envelope_is_held_to_strict_json_like_a_small_one(
    harness: Harness, keypair: KeyPair, tail: bytes
) -> None:
    running = await harness.start(keypair)
    head = json.dumps({"auth_data": keypair.auth_data(), "payload": {}})[:-2].encode()
    body = head + b'"file": "' + b64(bytes(2 * 1024 * 1024)).encode() + b'"' + tail
    headers = {"Content-Type": "application/json"}
    async with running.session.post(
        running.url + TRANSCRIPTIONS, data=body, headers=headers
    ) as response:
        assert response.status == 422
        assert "not valid JSON" in (await response.json())["error"]
    assert harness.engine.received == []
    good = head + b'"file": "' + b64(bytes(2 * 1024 * 1024)).encode() + b'"}}'
    async with running.session.post(
        running.url + TRANSCRIPTIONS, data=good, headers=headers
    ) as response:
        assert response.status == 200
