"""A recording fake of an OpenAI-compatible engine (vLLM's routes): every request is kept raw.

It answers each route in the shape vLLM does: completions and chat (JSON or SSE, with
`usage`), embeddings (with `usage`), speech (WAV bytes), transcriptions and translations
(JSON, or text for `response_format=text`), and images (JSON with `b64_json`). Routes in
`unserved` answer 404 as an engine that lacks them does; `failures` scripts an error answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

SPEECH_PREFIX = b"RIFF\x24\x00\x00\x00WAVEfmt "
NOT_FOUND_BODY = {"detail": "Not Found"}
"""What FastAPI (vLLM, SGLang) answers for a route it does not have."""


@dataclass
class FormPart:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Received:
    path: str
    content_type: str
    length: int | None
    json: Any = None
    parts: list[FormPart] = field(default_factory=list)

    def fields(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for part in self.parts:
            if part.filename is None:
                found.setdefault(part.name, []).append(part.data.decode())
        return found

    def files(self, name: str) -> list[FormPart]:
        return [part for part in self.parts if part.name == name and part.filename is not None]


class FakeOpenAI:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.unserved: set[str] = set()
        self.failures: dict[str, tuple[int, bytes, str]] = {}
        """path: (status, body, content type) answered instead of a result."""

    def on(self, path: str) -> list[Received]:
        return [item for item in self.received if item.path == path]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/translations", self.transcriptions)
        app.router.add_post("/v1/images/generations", self.images)
        app.router.add_post("/v1/images/edits", self.images)
        app.router.add_post("/v1/images/variations", self.images)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _receive(self, request: web.Request) -> tuple[Received, web.Response | None]:
        content_type = request.headers.get("Content-Type", "")
        item = Received(request.path, content_type, request.content_length)
        if content_type.startswith("multipart/form-data"):
            item.parts = await _parse_multipart(request)
        else:
            item.json = json.loads(await request.read())
        self.received.append(item)
        if request.path in self.unserved:
            return item, web.json_response(NOT_FOUND_BODY, status=404)
        failure = self.failures.get(request.path)
        if failure is not None:
            status, text, content_type = failure
            return item, web.Response(status=status, body=text, content_type=content_type)
        return item, None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        item, refused = await self._receive(request)
        if refused is not None:
            return refused
        payload = item.json
        tokens = int(payload.get("max_tokens") or 16)
        usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        if payload.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for index in range(3):
                chunk = {"choices": [{"text": f"t{index}", "index": 0}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(f"data: {json.dumps({'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response({"choices": [{"text": "done", "index": 0}], "usage": usage})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        item, refused = await self._receive(request)
        if refused is not None:
            return refused
        tokens = int(item.json.get("max_tokens") or 16)
        message = {"role": "assistant", "content": "done"}
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        return web.json_response({"choices": [{"message": message, "index": 0}], "usage": usage})

    async def embeddings(self, request: web.Request) -> web.Response:
        item, refused = await self._receive(request)
        if refused is not None:
            return refused
        value = item.json.get("input")
        inputs = value if isinstance(value, list) else [value]
        tokens = sum(len(str(text).split()) for text in inputs)
        data = [
            {"object": "embedding", "index": index, "embedding": [0.25, -0.5, 1.0]}
            for index in range(len(inputs))
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "usage": usage})

    async def speech(self, request: web.Request) -> web.Response:
        item, refused = await self._receive(request)
        if refused is not None:
            return refused
        audio = speech_bytes(str(item.json.get("input", "")))
        if item.json.get("seconds"):  # a long clip: past the worker's buffered-answer limit
            audio = audio * (int(item.json["seconds"]) * 32_000 // len(audio) + 1)
        content_type = "audio/mpeg" if item.json.get("response_format") == "mp3" else "audio/wav"
        return web.Response(body=audio, content_type=content_type)

    async def transcriptions(self, request: web.Request) -> web.Response:
        item, refused = await self._receive(request)
        if refused is not None:
            return refused
        files = item.files("file")
        if not files:
            return web.json_response({"error": "file missing"}, status=400)
        text = f"heard {len(files[0].data)} bytes"
        if item.fields().get("response_format") == ["text"]:
            return web.Response(text=text, content_type="text/plain")
        return web.json_response({"text": text})

    async def images(self, request: web.Request) -> web.Response:
        _, refused = await self._receive(request)
        if refused is not None:
            return refused
        data = [{"b64_json": base64.b64encode(b"\x89PNG fake").decode()}]
        return web.json_response({"created": 1, "data": data})


def speech_bytes(text: str) -> bytes:
    """Audio that is not text: a WAV-looking header and bytes no UTF-8 decoder accepts."""
    digest = hashlib.sha256(text.encode()).digest()
    return SPEECH_PREFIX + bytes(range(256)) + digest * 64


async def _parse_multipart(request: web.Request) -> list[FormPart]:
    """The parts as a real framework's parser (aiohttp's) reads them off the socket."""
    reader = await request.multipart()
    parts: list[FormPart] = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)
        data = bytes(await part.read(decode=False))
        parts.append(
            FormPart(part.name or "", part.filename, part.headers.get("Content-Type"), data)
        )
    return parts
