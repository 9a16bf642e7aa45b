"""A request body other than the payload's JSON, for model servers that want another format.

The envelope is JSON, so a route whose model server wants, say, `multipart/form-data` (an
OpenAI transcription: the audio as a file part) names a `body_encoder` in its `RouteConfig`.
The encoder turns the payload into an `EncodedBody`: its content type and its bytes as a list
of parts, sent one after the other without being joined, so a large upload is never copied
into one more buffer. An encoder refuses input it cannot encode with `PayloadRefused`, whose
status (413, 422) and field errors reach the client; the model server then sees nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

BodyPart: TypeAlias = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class EncodedBody:
    """What is sent to the model server: `parts` in order, under `content_type`."""

    content_type: str
    parts: Sequence[BodyPart]

    def __post_init__(self) -> None:
        if "\r" in self.content_type or "\n" in self.content_type:
            raise ValueError("a content type is one header line")

    @property
    def length(self) -> int:
        return sum(len(part) for part in self.parts)

    def join(self) -> bytes:
        """The whole body in one buffer: for tests and small bodies only."""
        return b"".join(self.parts)


class PayloadRefused(ValueError):
    """The payload cannot be encoded: `status` and `fields` say why, field by field."""

    def __init__(self, status: int, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.fields}


BodyEncoder: TypeAlias = Callable[[dict[str, Any]], EncodedBody | Awaitable[EncodedBody]]
"""`body_encoder(payload)`: the body to send instead of the payload's JSON."""
