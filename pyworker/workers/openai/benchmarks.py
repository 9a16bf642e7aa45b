"""The benchmark's payloads for each route, made in code: nothing is shipped as media or fetched.

Texts come from the completions prompts in `benchmark.jsonl`; the audio clip is a WAV written
here (a gliding tone with a little noise, different for every payload so that no engine
answers from a cache); the images are PNGs written here the same way. Upload routes get their
files base64-encoded, exactly as a client sends them, so the benchmark runs through the same
decoding and multipart encoding as every request.
"""

from __future__ import annotations

import base64
import io
import math
import random
import struct
import wave
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from pyworker.config import JSONObject, LimitProbe

SAMPLE_RATE = 16_000
"""Whisper's rate: engines resample anything else to it."""
CLIP_SECONDS = 10.0
IMAGE_SIDE = 1024
"""The reference worker's benchmark image: one 1024x1024 image a request."""
EDIT_SIDE = 256
"""The input image of an edit or a variation: small, it is only conditioning."""
PAYLOADS = 8


@dataclass(frozen=True, slots=True)
class RouteBenchmark:
    """A route's benchmark: how to make its payloads (the ramp finds how many at once)."""

    payloads: Callable[[list[str]], list[JSONObject]]
    """From the shipped prompt texts, the route's payloads (without `model`)."""


@dataclass(frozen=True, slots=True)
class EngineBenchmark:
    """What an engine adds to the benchmark: fields for its text payloads (`ignore_eos`, so
    that answers are as long as asked), and where it declares how many it serves at once."""

    text_fields: JSONObject = field(default_factory=dict)
    limit_probe: LimitProbe | None = None


def wav_clip(seed: int, seconds: float = CLIP_SECONDS) -> bytes:
    """A mono 16-bit 16 kHz WAV: a tone gliding over speech frequencies, with noise."""
    generator = random.Random(seed)
    count = int(seconds * SAMPLE_RATE)
    low, high = 180.0 + seed % 7 * 10, 900.0
    phase = 0.0
    samples = bytearray()
    for index in range(count):
        progress = index / count
        frequency = low + (high - low) * (0.5 - 0.5 * math.cos(2 * math.pi * 3 * progress))
        phase += 2 * math.pi * frequency / SAMPLE_RATE
        value = 0.4 * math.sin(phase) + 0.05 * (generator.random() - 0.5)
        samples += struct.pack("<h", int(value * 32767))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(SAMPLE_RATE)
        clip.writeframes(bytes(samples))
    return buffer.getvalue()


def png_image(seed: int, side: int) -> bytes:
    """An RGB PNG of random 16-pixel tiles: cheap to make, new for every seed."""
    generator = random.Random(seed)
    tile = 16
    rows = []
    for _ in range(side // tile):
        row = b"".join(
            bytes(generator.randrange(256) for _ in range(3)) * tile for _ in range(side // tile)
        )
        rows.extend([b"\x00" + row] * tile)  # filter type 0 for every scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 6))
        + chunk(b"IEND", b"")
    )


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def chat(prompts: list[str]) -> list[JSONObject]:
    return [{"messages": [{"role": "user", "content": text}], "max_tokens": 96} for text in prompts]


def embeddings(prompts: list[str]) -> list[JSONObject]:
    """Each payload embeds a few sentences: about 50 to 100 tokens of input."""
    return [
        {"input": " ".join(prompts[(index + step) % len(prompts)] for step in range(4))}
        for index in range(len(prompts))
    ]


def speech(prompts: list[str]) -> list[JSONObject]:
    return [{"input": text, "response_format": "wav"} for text in prompts]


def transcriptions(prompts: list[str]) -> list[JSONObject]:
    return [
        {"file": encoded(wav_clip(seed)), "filename": f"clip{seed}.wav", "response_format": "json"}
        for seed in range(min(PAYLOADS, len(prompts)))
    ]


def image_generations(prompts: list[str]) -> list[JSONObject]:
    return [{"prompt": text, "size": f"{IMAGE_SIDE}x{IMAGE_SIDE}", "n": 1} for text in prompts]


def image_edits(prompts: list[str]) -> list[JSONObject]:
    return [
        {
            "image": encoded(png_image(seed, EDIT_SIDE)),
            "filename": "image.png",
            "prompt": prompts[seed % len(prompts)],
            "size": f"{EDIT_SIDE}x{EDIT_SIDE}",
            "n": 1,
        }
        for seed in range(min(PAYLOADS, len(prompts)))
    ]


def image_variations(prompts: list[str]) -> list[JSONObject]:
    return [
        {
            "image": encoded(png_image(seed, EDIT_SIDE)),
            "filename": "image.png",
            "size": f"{EDIT_SIDE}x{EDIT_SIDE}",
            "n": 1,
        }
        for seed in range(min(PAYLOADS, len(prompts)))
    ]
