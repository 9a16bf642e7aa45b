"""The multipart encoding of uploads, read back by python-multipart: the parser of Starlette,
FastAPI and so of vLLM and SGLang. Base64 in its forms (padding, line breaks, `data:` URIs,
slices) decodes to the same bytes as the standard library's decoder."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import pytest

from pyworker.config.encoded_body import EncodedBody, PayloadRefused
from pyworker.workers.openai import uploads
from pyworker.workers.openai.uploads import (
    AUDIO_TYPES,
    IMAGE_TYPES,
    FileField,
    UploadForm,
    UploadLimits,
    safe_filename,
)

python_multipart = pytest.importorskip("python_multipart")

EDIT = UploadForm(
    (
        FileField("image", "filename", IMAGE_TYPES, "image.png", many=True, required=True),
        FileField("mask", "mask_filename", IMAGE_TYPES, "mask.png"),
    ),
    UploadLimits(),
    {"model": "served"},
)
AUDIO = UploadForm(
    (FileField("file", "filename", AUDIO_TYPES, "audio.wav", required=True),), UploadLimits()
)


def parse(body: EncodedBody) -> tuple[list[tuple[str, str]], list[tuple[str, str, bytes]]]:
    """Fields and files as python-multipart reads them."""
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, str, bytes]] = []

    def on_field(field: Any) -> None:
        fields.append((field.field_name.decode(), field.value.decode()))

    def on_file(file: Any) -> None:
        file.file_object.seek(0)
        files.append((file.field_name.decode(), file.file_name.decode(), file.file_object.read()))

    headers = {"Content-Type": body.content_type, "Content-Length": str(body.length)}
    python_multipart.parse_form(headers, io.BytesIO(body.join()), on_field, on_file)
    return fields, files


def test_fields_and_files_read_back_as_sent() -> None:
    image = os.urandom(300_000)
    payload = {
        "image": [base64.b64encode(image).decode(), base64.b64encode(b"\r\n--x\r\n").decode()],
        "filename": ["dir/a.PNG", "b.jpeg"],
        "mask": base64.b64encode(b"mask").decode(),
        "prompt": 'say "hi"\r\nthen stop',
        "n": 2,
        "stream": False,
        "weights": [0.5, 1],
        "extra": {"a": [1, 2]},
        "skipped": None,
    }
    fields, files = parse(EDIT.encode(payload))
    assert fields == [
        ("model", "served"),
        ("prompt", 'say "hi"\r\nthen stop'),
        ("n", "2"),
        ("stream", "false"),
        ("weights", "0.5"),
        ("weights", "1"),
        ("extra", '{"a":[1,2]}'),
    ]
    assert files == [
        ("image", "a.PNG", image),
        ("image", "b.jpeg", b"\r\n--x\r\n"),
        ("mask", "mask.png", b"mask"),
    ]


@pytest.mark.parametrize(
    "shape",
    ["padded", "unpadded", "mime lines", "data uri", "spaces"],
)
def test_base64_in_its_forms_decodes_as_the_standard_decoder(
    shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uploads, "DECODE_SLICE", 64)  # many slices, line breaks across them
    data = os.urandom(1001)
    text = base64.b64encode(data).decode()
    if shape == "unpadded":
        text = text.rstrip("=")
    elif shape == "mime lines":
        text = base64.encodebytes(data).decode()
    elif shape == "data uri":
        text = "data:audio/wav;base64," + text
    elif shape == "spaces":
        text = " ".join(text[index : index + 7] for index in range(0, len(text), 7))
    _, files = parse(AUDIO.encode({"file": text}))
    assert files == [("file", "audio.wav", data)]


@pytest.mark.parametrize("text", ["QUJD=QUJD", "QU=JD", "Q===", "QUJDR", "QUJD\u00e9", "****"])
def test_what_the_standard_decoder_refuses_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        base64.b64decode(text, validate=True)
    with pytest.raises(PayloadRefused) as refused:
        AUDIO.encode({"file": text})
    assert refused.value.status == 422 and "not valid base64" in refused.value.fields["file"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("../../etc/cron.d/x.wav", "x.wav"),
        ('a"\r\nX: 1.wav', "a___X__1.wav"),
        (".hidden.wav", "hidden.wav"),
        ("", "audio.wav"),
        ("a" * 200 + ".wav", "a" * 128 + ".wav"),
    ],
)
def test_file_names_are_safe_basenames_that_keep_their_extension(given: str, expected: str) -> None:
    assert safe_filename(given, "audio.wav") == expected


def test_the_decoded_file_is_the_only_large_copy() -> None:
    """No part of the body holds more than one decode slice of the file."""
    data = os.urandom(5 * uploads.DECODE_SLICE)
    body = AUDIO.encode({"file": base64.b64encode(data).decode()})
    assert max(len(part) for part in body.parts) <= uploads.DECODE_SLICE * 3 // 4
    assert sum(len(part) for part in body.parts) - len(data) < 1024
