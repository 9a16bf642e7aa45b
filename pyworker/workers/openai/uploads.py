"""Uploads: base64 in the JSON payload, file parts in the `multipart/form-data` the engine gets.

The envelope is JSON, so a transcription's audio or an edit's images arrive base64-encoded
(`file`, `image` (one or a list), `mask`; `filename`, `mask_filename` name them). The OpenAI
API wants them as file parts, so each upload is decoded a slice at a time straight into the
parts of the multipart body (never joined, never decoded twice), and the other payload fields
become form fields. Sizes are checked before decoding where the length tells, and exactly
after: one file at most `file_bytes`, all files of a request at most `request_bytes`.
"""

from __future__ import annotations

import asyncio
import binascii
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from pyworker.config import JSONObject
from pyworker.config.encoded_body import BodyPart, EncodedBody, PayloadRefused
from pyworker.config.loader import ConfigError

MiB = 1024 * 1024
DEFAULT_FILE_BYTES = 25 * MiB
"""OpenAI's own limit on one audio file, and the reference worker's."""
DEFAULT_REQUEST_BYTES = 64 * MiB
MAX_FILES = 16
"""Files in one field (`image` as a list): a bound, not a model's limit."""
DECODE_SLICE = MiB
"""Base64 characters decoded at once (a multiple of 4): 768 KiB of file per body part."""
THREAD_THRESHOLD = MiB
"""Base64 characters above which a request's uploads are decoded off the event loop."""
MAX_DATA_URI_PREFIX = 128
"""`data:audio/wav;base64,` and the like: where the comma must be."""
MAX_FILENAME = 128

BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
WHITESPACE = b" \t\r\n"

# Engines pick a decoder from the part's content type, which comes from the extension.
AUDIO_TYPES: Mapping[str, str] = {
    "flac": "audio/flac",
    "m4a": "audio/mp4",
    "mp3": "audio/mpeg",
    "mp4": "audio/mp4",
    "mpeg": "audio/mpeg",
    "mpga": "audio/mpeg",
    "ogg": "audio/ogg",
    "wav": "audio/wav",
    "webm": "audio/webm",
}
IMAGE_TYPES: Mapping[str, str] = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}


@dataclass(frozen=True, slots=True)
class UploadLimits:
    file_bytes: int = DEFAULT_FILE_BYTES
    request_bytes: int = DEFAULT_REQUEST_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> UploadLimits:
        return cls(
            _positive(environ, "OPENAI_MAX_FILE_BYTES", DEFAULT_FILE_BYTES),
            _positive(environ, "OPENAI_MAX_REQUEST_FILE_BYTES", DEFAULT_REQUEST_BYTES),
        )

    @property
    def body_bytes(self) -> int:
        """The envelope that can carry `request_bytes` of base64, plus room for the rest."""
        return math.ceil(self.request_bytes / 3) * 4 + MiB


def _positive(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f"{name}={text!r}: expected a positive number of bytes")
    return int(text)


@dataclass(frozen=True, slots=True)
class FileField:
    """One upload field of a route: its payload key (also the form field's name)."""

    name: str
    filename_key: str
    types: Mapping[str, str]
    default_filename: str
    many: bool = False
    required: bool = False
    unless: tuple[str, ...] = ()
    """Payload fields that stand in for this one when present (`url` for an edit's image)."""


@dataclass(frozen=True, slots=True)
class Upload:
    """One file, before decoding: where it came from and what it will be called."""

    label: str
    """The payload field, with its index for a list (`image.1`): what an error names."""
    field: str
    text: str
    start: int
    """Where the base64 starts (after a `data:` prefix)."""
    filename: str
    content_type: str

    @property
    def decoded_bound(self) -> int:
        """The decoded size if the text has no whitespace: an upper bound."""
        return (len(self.text) - self.start) * 3 // 4


class UploadForm:
    """How one route's payload becomes a multipart body: a route's `body_encoder`."""

    def __init__(
        self,
        files: tuple[FileField, ...],
        limits: UploadLimits,
        defaults: Mapping[str, str] | None = None,
    ) -> None:
        self.files = files
        self.limits = limits
        self.defaults = dict(defaults or {})
        """Form fields added when the payload has none (`model`, the served model)."""
        self._skipped = {f.name for f in files} | {f.filename_key for f in files}

    async def __call__(self, payload: JSONObject) -> EncodedBody:
        if _base64_chars(payload, self.files) > THREAD_THRESHOLD:
            return await asyncio.to_thread(self.encode, payload)
        return self.encode(payload)

    def encode(self, payload: JSONObject) -> EncodedBody:
        uploads = self.uploads(payload)
        self._check_sizes(uploads)
        boundary = "pyworker-" + secrets.token_hex(16)
        delimiter = f"--{boundary}\r\n".encode()
        parts: list[BodyPart] = []
        fields = {**self.defaults, **payload}
        for name, value in fields.items():
            if name in self._skipped:
                continue
            for text in _form_values(value):
                parts.append(delimiter + _field_head(name) + b"\r\n" + text.encode() + b"\r\n")
        total = 0
        for upload in uploads:
            parts.append(delimiter + _file_head(upload) + b"\r\n")
            size = _decode_into(parts, upload)
            if size > self.limits.file_bytes:
                raise _too_large(upload.label, f"over {self.limits.file_bytes} bytes")
            total += size
            if total > self.limits.request_bytes:
                raise _too_large(upload.label, self._request_over)
            parts.append(b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return EncodedBody(f"multipart/form-data; boundary={boundary}", parts)

    def uploads(self, payload: JSONObject) -> list[Upload]:
        """Every file of the payload, its type checked; 422 naming the field otherwise."""
        found: list[Upload] = []
        for spec in self.files:
            value = payload.get(spec.name)
            if value is None:
                if spec.required and not any(payload.get(key) for key in spec.unless):
                    alternatives = "".join(f" (or {key})" for key in spec.unless)
                    raise _invalid(spec.name, f"missing parameter: a base64 string{alternatives}")
                continue
            names = payload.get(spec.filename_key)
            if spec.many and isinstance(value, list):
                if not value or len(value) > MAX_FILES:
                    raise _invalid(spec.name, f"expected 1 to {MAX_FILES} base64 strings")
                if names is not None and not isinstance(names, list):
                    names = [names] * len(value)
                labels = [f"{spec.name}.{index}" for index in range(len(value))]
                for index, (label, item) in enumerate(zip(labels, value, strict=True)):
                    name = names[index] if isinstance(names, list) and index < len(names) else None
                    found.append(_upload(spec, label, item, name, f"{spec.filename_key}.{index}"))
            else:
                if isinstance(names, list) and spec.many:
                    names = names[0] if names else None
                found.append(_upload(spec, spec.name, value, names, spec.filename_key))
        return found

    def _check_sizes(self, uploads: list[Upload]) -> None:
        """Before decoding: what the base64's length says (whitespace discounted if near)."""
        total = 0
        for upload in uploads:
            size = upload.decoded_bound
            if size > self.limits.file_bytes or total + size > self.limits.request_bytes:
                size = _decoded_size(upload)
            if size > self.limits.file_bytes:
                raise _too_large(upload.label, f"over {self.limits.file_bytes} bytes")
            total += size
            if total > self.limits.request_bytes:
                raise _too_large(upload.label, self._request_over)

    @property
    def _request_over(self) -> str:
        return f"the request's files are over {self.limits.request_bytes} bytes in all"


def _base64_chars(payload: JSONObject, files: tuple[FileField, ...]) -> int:
    total = 0
    for spec in files:
        value = payload.get(spec.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                total += len(item)
    return total


def _upload(spec: FileField, label: str, value: object, name: object, name_label: str) -> Upload:
    if not isinstance(value, str):
        expected = "a base64 string or a list of them" if spec.many else "a base64 string"
        raise _invalid(label, f"must be {expected}")
    start = 0
    if value[:5].lower() == "data:":
        comma = value.find(",", 0, MAX_DATA_URI_PREFIX)
        if comma < 0:
            raise _invalid(label, "a data: URI without a comma before its data")
        start = comma + 1
    if name is not None and not isinstance(name, str):
        raise _invalid(name_label, "must be a file name")
    filename = safe_filename(name or "", spec.default_filename)
    extension = filename.rpartition(".")[2].lower() if "." in filename else ""
    content_type = spec.types.get(extension)
    if content_type is None:
        allowed = ", ".join(sorted(spec.types))
        raise _invalid(
            name_label if name else label,
            f"unsupported file type {extension or '(none)'!r}: expected one of {allowed}",
        )
    return Upload(label, spec.name, value, start, filename, content_type)


def safe_filename(name: str, default: str) -> str:
    """A basename of safe characters with its extension kept: it goes into a header."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name.strip())).lstrip(".")
    if not base:
        return default
    stem, dot, extension = base.rpartition(".")
    if not dot:
        return base[:MAX_FILENAME]
    return stem[:MAX_FILENAME] + "." + extension[:16]


def _decoded_size(upload: Upload) -> int:
    """The exact decoded size, whitespace discounted: only for uploads near the limits."""
    text = upload.text
    blanks = sum(text.count(character, upload.start) for character in " \t\r\n")
    padding = 0
    end = len(text.rstrip())
    while padding < 2 and end > upload.start and text[end - 1] == "=":
        padding, end = padding + 1, end - 1
    return max(0, (len(text) - upload.start - blanks - padding) * 3 // 4)


def _decode_into(parts: list[BodyPart], upload: Upload) -> int:
    """Decode the base64 a slice at a time, each slice a body part; the decoded size."""
    text, label = upload.text, upload.label
    carry = b""
    size = 0
    position = upload.start
    while position < len(text):
        piece = text[position : position + DECODE_SLICE]
        position += len(piece)
        try:
            chunk = carry + piece.encode("ascii").translate(None, WHITESPACE)
        except UnicodeEncodeError:
            raise _invalid(label, "not valid base64: a character outside its alphabet") from None
        if position >= len(text):  # the last slice: padding allowed at its end only
            body = chunk.rstrip(b"=")
            padding = len(chunk) - len(body)
            if len(body) % 4 == 1 or padding > 2 or (padding and len(chunk) % 4):
                raise _invalid(label, "not valid base64: truncated or wrongly padded")
            chunk, carry = body + b"=" * (-len(body) % 4), b""
        else:
            cut = len(chunk) - len(chunk) % 4
            body, carry = chunk[:cut], chunk[cut:]
            chunk = body
        if body.translate(None, BASE64_ALPHABET):
            raise _invalid(label, "not valid base64: a character outside its alphabet")
        try:
            decoded = binascii.a2b_base64(chunk)
        except binascii.Error:
            raise _invalid(label, "not valid base64") from None
        if decoded:
            parts.append(decoded)
            size += len(decoded)
    if size == 0:
        raise _invalid(label, "decoded to zero bytes")
    return size


def _form_values(value: Any) -> list[str]:
    """A payload value as form field values: lists repeat the field, objects are JSON."""
    if value is None:
        return []
    if isinstance(value, list):
        if all(isinstance(item, str | int | float) for item in value):
            return [_scalar(item) for item in value]
        return [orjson.dumps(value).decode()]
    if isinstance(value, dict):
        return [orjson.dumps(value).decode()]
    return [_scalar(value)]


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _quoted(name: str) -> str:
    """A name inside a quoted header parameter, escaped as browsers do (WHATWG)."""
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _field_head(name: str) -> bytes:
    return f'Content-Disposition: form-data; name="{_quoted(name)}"\r\n'.encode()


def _file_head(upload: Upload) -> bytes:
    return (
        f'Content-Disposition: form-data; name="{_quoted(upload.field)}"; '
        f'filename="{upload.filename}"\r\nContent-Type: {upload.content_type}\r\n'
    ).encode()


def _invalid(field: str, message: str) -> PayloadRefused:
    return PayloadRefused(422, "invalid upload", {field: message})


def _too_large(field: str, message: str) -> PayloadRefused:
    return PayloadRefused(413, "upload too large", {field: message})
