"""The OpenAI API routes the worker serves, how each is weighed, and which one is benchmarked.

Every route's workload is in tokens, the benchmark's unit, so that the autoscaler's estimate
of the work waiting on a worker (its workload over its measured tokens/s) holds whichever
routes the requests use. Text routes count tokens (README.md, "What counts as workload");
audio counts `AUDIO_TOKENS_PER_SECOND` a second of audio, and images
`IMAGE_TOKENS_PER_MEGAPIXEL` per million output pixels. Those two rates are conventions, not
measurements: when the benchmarked route is the one that carries the traffic, the benchmark
measures in the same convention and the estimate is exact in its own terms.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pyworker.config import BenchmarkConfig, JSONObject, ProducedWork, RouteConfig
from pyworker.config.encoded_body import BodyEncoder
from pyworker.config.loader import ConfigError
from pyworker.workers.openai import benchmarks
from pyworker.workers.openai.benchmarks import EngineBenchmark
from pyworker.workers.openai.uploads import (
    AUDIO_TYPES,
    IMAGE_TYPES,
    FileField,
    UploadForm,
    UploadLimits,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
SPEECH = "/v1/audio/speech"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
IMAGE_GENERATIONS = "/v1/images/generations"
IMAGE_EDITS = "/v1/images/edits"
IMAGE_VARIATIONS = "/v1/images/variations"
ALL_ROUTES = (
    COMPLETIONS,
    CHAT,
    EMBEDDINGS,
    SPEECH,
    TRANSCRIPTIONS,
    TRANSLATIONS,
    IMAGE_GENERATIONS,
    IMAGE_EDITS,
    IMAGE_VARIATIONS,
)
DEFAULT_BENCHMARK_ROUTE = COMPLETIONS

CHARS_PER_TOKEN = 4.0
MAX_ITEMS = 100_000
AUDIO_TOKENS_PER_SECOND = 50.0
"""Whisper's encoder reads 1500 positions per 30 s window: 50 a second of audio."""
SPEECH_CHARS_PER_SECOND = 15.0
"""Speech runs at about 150 words a minute: 15 characters of text a second of audio."""
IMAGE_TOKENS_PER_MEGAPIXEL = 4096.0
"""A 1024x1024 image is 4096 latent patches in a diffusion transformer (SD3, Flux)."""
DEFAULT_IMAGE_SIDE = 1024
MAX_IMAGE_SIDE = 8192
MAX_IMAGES = 128
AUDIO_BYTES_PER_SECOND: Mapping[str, float] = {
    "wav": 32_000.0,  # 16-bit mono 16 kHz, when its header cannot be read
    "flac": 12_000.0,
    "ogg": 8_000.0,
    "webm": 8_000.0,
}
DEFAULT_AUDIO_BYTES_PER_SECOND = 16_000.0
"""128 kbit/s: mp3 and m4a as phones and browsers record them."""
WAV_HEADER_CHARS = 64
"""Base64 characters that cover a WAV header's byte rate (bytes 28 to 31)."""


# --- workload per route -----------------------------------------------------------------------
def text_tokens(text: str) -> float:
    return float(math.ceil(len(text) / CHARS_PER_TOKEN))


def embedding_workload(payload: JSONObject) -> float:
    """Input tokens: `input` is a text, token ids, or a list of either."""
    value = payload.get("input")
    items = value if isinstance(value, list) else [value]
    if items and all(isinstance(item, int) for item in items[:MAX_ITEMS]):
        return float(min(len(items), MAX_ITEMS))
    total = 0.0
    for item in items[:MAX_ITEMS]:
        if isinstance(item, str):
            total += text_tokens(item)
        elif isinstance(item, list):
            total += min(len(item), MAX_ITEMS)
    return total


def speech_workload(payload: JSONObject) -> float:
    """Seconds of audio the text will make, in audio tokens."""
    text = payload.get("input")
    seconds = len(text) / SPEECH_CHARS_PER_SECOND if isinstance(text, str) else 0.0
    return math.ceil(seconds * AUDIO_TOKENS_PER_SECOND)


def transcription_workload(payload: JSONObject) -> float:
    """Seconds of audio in the upload, in audio tokens; read from a WAV header, else from
    its size at the format's usual byte rate."""
    value = payload.get("file")
    if not isinstance(value, str):
        return 0.0
    start = value.find(",", 0, 128) + 1 if value[:5].lower() == "data:" else 0
    size = (len(value) - start) * 3 / 4
    name = payload.get("filename")
    extension = name.rpartition(".")[2].lower() if isinstance(name, str) else "wav"
    per_second = _wav_byte_rate(value[start : start + WAV_HEADER_CHARS])
    if per_second is None:
        per_second = AUDIO_BYTES_PER_SECOND.get(extension, DEFAULT_AUDIO_BYTES_PER_SECOND)
    return math.ceil(size / per_second * AUDIO_TOKENS_PER_SECOND)


def _wav_byte_rate(head: str) -> float | None:
    try:
        header = base64.b64decode(head[: len(head) - len(head) % 4])
    except (binascii.Error, ValueError):
        return None
    if len(header) < 32 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    rate = int.from_bytes(header[28:32], "little")
    return float(rate) if rate > 0 else None


def image_workload(payload: JSONObject) -> float:
    """Output pixels (`n` images of `size`) in image tokens; "auto" or none is 1024x1024."""
    width = height = DEFAULT_IMAGE_SIDE
    size = payload.get("size")
    if isinstance(size, str):
        first, separator, second = size.lower().partition("x")
        if separator and first.isdigit() and second.isdigit():
            width = min(int(first), MAX_IMAGE_SIDE)
            height = min(int(second), MAX_IMAGE_SIDE)
    count = payload.get("n", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        count = 1
    megapixels = width * height / (1024 * 1024)
    return math.ceil(min(count, MAX_IMAGES) * megapixels * IMAGE_TOKENS_PER_MEGAPIXEL)


DEFAULT_LIMITS = UploadLimits()


def unwrap_input(payload: JSONObject) -> JSONObject:
    """`{"input": {...request...}}`, the shape Vast's serverless clients may send, is the
    request inside; an `input` that is text or a list (embeddings, speech) stays a field."""
    inner = payload.get("input")
    return inner if isinstance(inner, dict) else payload


# --- the route table --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RouteSettings:
    """What the routes need from the worker's config."""

    text_workload: Callable[[JSONObject], float]
    """Completions and chat: the prompt's tokens plus those it may generate (worker.py)."""
    produced_tokens: ProducedWork
    """Tokens an answer's `usage` reports (worker.py)."""
    limits: UploadLimits = DEFAULT_LIMITS
    model: str | None = None
    max_queue_time: float = 30.0


def _upload_forms(settings: RouteSettings) -> dict[str, BodyEncoder]:
    defaults = {"model": settings.model} if settings.model else {}
    audio = FileField("file", "filename", AUDIO_TYPES, "audio.wav", required=True)
    image = FileField(
        "image", "filename", IMAGE_TYPES, "image.png", many=True, required=True, unless=("url",)
    )
    one_image = FileField("image", "filename", IMAGE_TYPES, "image.png", required=True)
    mask = FileField("mask", "mask_filename", IMAGE_TYPES, "mask.png")
    return {
        TRANSCRIPTIONS: UploadForm((audio,), settings.limits, defaults),
        TRANSLATIONS: UploadForm((audio,), settings.limits, defaults),
        IMAGE_EDITS: UploadForm((image, mask), settings.limits, defaults),
        IMAGE_VARIATIONS: UploadForm((one_image,), settings.limits, defaults),
    }


def route_configs(paths: list[str], settings: RouteSettings) -> list[RouteConfig]:
    """The `RouteConfig`s of the served `paths`."""
    forms = _upload_forms(settings)
    weights: dict[str, Callable[[JSONObject], float]] = {
        COMPLETIONS: settings.text_workload,
        CHAT: settings.text_workload,
        EMBEDDINGS: embedding_workload,
        SPEECH: speech_workload,
        TRANSCRIPTIONS: transcription_workload,
        TRANSLATIONS: transcription_workload,
        IMAGE_GENERATIONS: image_workload,
        IMAGE_EDITS: image_workload,
        IMAGE_VARIATIONS: image_workload,
    }
    counted_by_usage = {COMPLETIONS, CHAT, EMBEDDINGS}
    return [
        RouteConfig(
            path=path,
            workload=weights[path],
            produced_work=settings.produced_tokens if path in counted_by_usage else None,
            body_encoder=forms.get(path),
            request_hook=unwrap_input,
            max_queue_time=settings.max_queue_time,
        )
        for path in paths
    ]


# --- which routes, which benchmark ------------------------------------------------------------
ROUTE_BENCHMARKS: dict[str, benchmarks.RouteBenchmark] = {
    CHAT: benchmarks.RouteBenchmark(benchmarks.chat),
    EMBEDDINGS: benchmarks.RouteBenchmark(benchmarks.embeddings),
    SPEECH: benchmarks.RouteBenchmark(benchmarks.speech),
    TRANSCRIPTIONS: benchmarks.RouteBenchmark(benchmarks.transcriptions),
    TRANSLATIONS: benchmarks.RouteBenchmark(benchmarks.transcriptions),
    IMAGE_GENERATIONS: benchmarks.RouteBenchmark(benchmarks.image_generations),
    IMAGE_EDITS: benchmarks.RouteBenchmark(benchmarks.image_edits),
    IMAGE_VARIATIONS: benchmarks.RouteBenchmark(benchmarks.image_variations),
}


class RouteChoiceError(ConfigError):
    """`OPENAI_ROUTES` or `BENCHMARK_ROUTE` names what cannot be served: a start-up error."""


def benchmark_route(environ: Mapping[str, str]) -> str:
    path = environ.get("BENCHMARK_ROUTE", "").strip() or DEFAULT_BENCHMARK_ROUTE
    if path not in ALL_ROUTES:
        raise RouteChoiceError(
            f"BENCHMARK_ROUTE={path!r} is not a route of this worker; expected one of "
            + ", ".join(ALL_ROUTES)
        )
    return path


def served_routes(environ: Mapping[str, str]) -> list[str]:
    """`OPENAI_ROUTES` (comma-separated), else every route; it must hold the benchmark route."""
    benchmarked = benchmark_route(environ)
    text = environ.get("OPENAI_ROUTES", "").strip()
    if not text:
        return list(ALL_ROUTES)
    wanted = [path.strip() for path in text.split(",") if path.strip()]
    unknown = [path for path in wanted if path not in ALL_ROUTES]
    if unknown:
        raise RouteChoiceError(
            f"OPENAI_ROUTES names {', '.join(unknown)}, not routes of this worker; expected "
            "some of " + ", ".join(ALL_ROUTES)
        )
    if benchmarked not in wanted:
        raise RouteChoiceError(
            f"OPENAI_ROUTES does not include the benchmark route {benchmarked}: add it, or set "
            "BENCHMARK_ROUTE to one of the routes served"
        )
    return [path for path in ALL_ROUTES if path in wanted]


def benchmark_config(
    path: str,
    completions: list[JSONObject],
    model: str | None,
    prompts: list[str],
    custom: bool = False,
    speech_voice: str | None = None,
    engine: EngineBenchmark | None = None,
) -> BenchmarkConfig:
    """The benchmark of `path`: the completions dataset for completions, the route's own
    payloads made from the same prompts for the others, or a `custom` dataset as it is.
    Speech payloads name `speech_voice` when given (engines disagree on voice names). The
    `engine`'s text fields go into completions and chat payloads, its probe reads the ceiling."""
    engine = engine or EngineBenchmark()
    hint = (
        f"if the model does not serve {path}, set BENCHMARK_ROUTE to a route it serves "
        f"(and OPENAI_ROUTES to the routes it serves)"
    )
    probe = engine.limit_probe
    if path == COMPLETIONS or custom:
        dataset = completions if custom else [item | engine.text_fields for item in completions]
        return BenchmarkConfig(route=path, dataset=dataset, failure_hint=hint, limit_probe=probe)
    spec = ROUTE_BENCHMARKS[path]
    fields: JSONObject = {"model": model} if model else {}
    if path == SPEECH and speech_voice:
        fields["voice"] = speech_voice
    if path == CHAT:
        fields |= engine.text_fields
    return BenchmarkConfig(
        route=path,
        generator=BenchmarkPayloads(spec, prompts, fields),
        failure_hint=hint,
        limit_probe=probe,
    )


class BenchmarkPayloads:
    """The benchmark's generator: payloads are made on first use (audio and images take a
    moment), off the event loop where the benchmark loads its dataset."""

    def __init__(
        self, spec: benchmarks.RouteBenchmark, prompts: list[str], fields: JSONObject
    ) -> None:
        self.spec = spec
        self.prompts = prompts
        self.fields = fields
        """Added to every payload: the served model, a voice."""
        self._made: list[JSONObject] | None = None

    def __call__(self, index: int) -> JSONObject:
        if self._made is None:
            self._made = self.spec.payloads(self.prompts)
        payload = self._made[index % len(self._made)]
        return payload | self.fields
