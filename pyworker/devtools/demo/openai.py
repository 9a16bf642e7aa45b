"""The OpenAI request and response shapes that the demo model server speaks.

Parsing is strict about types (a wrong type is a 400, as vLLM answers) and lenient about
everything the demo ignores (temperature, stop words, model name...).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pyworker.backports import StrEnum
from pyworker.devtools.demo.text import count_prompt_tokens

DEFAULT_MAX_TOKENS = 16


class RequestError(Exception):
    """A request the server refuses with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Kind(StrEnum):
    COMPLETION = "completion"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    kind: Kind
    prompt_key: str  # seeds the pseudo-text; never logged
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def error_body(
    message: str, error_type: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


def parse_completion(body: object, max_tokens_limit: int) -> GenerationRequest:
    fields = _object(body)
    prompt = fields.get("prompt")
    if isinstance(prompt, str):
        key, tokens = prompt, count_prompt_tokens(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_prompt_part(part) for part in prompt):
        key, tokens = json.dumps(prompt), sum(_part_tokens(part) for part in prompt)
    else:
        raise RequestError("prompt must be a string or a non-empty list", "prompt")
    return _generation(Kind.COMPLETION, fields, key, tokens, max_tokens_limit)


def parse_chat(body: object, max_tokens_limit: int) -> GenerationRequest:
    fields = _object(body)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    texts = [_message_text(message) for message in messages]
    key = json.dumps(messages, sort_keys=True)
    tokens = sum(count_prompt_tokens(text) for text in texts)
    return _generation(Kind.CHAT, fields, key, tokens, max_tokens_limit)


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model")
    count = body.get("n")
    if count is not None and (not _is_int(count) or count != 1):
        raise RequestError("only n=1 is supported", "n")
    return body


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_prompt_part(part: object) -> bool:
    if isinstance(part, str) or _is_int(part):
        return True
    return isinstance(part, list) and all(_is_int(token) for token in part)


def _part_tokens(part: object) -> int:
    if isinstance(part, str):
        return count_prompt_tokens(part)
    return len(part) if isinstance(part, list) else 1


def _message_text(message: object) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError("each message must be an object with a string role", "messages")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return " ".join(str(part.get("text", "")) for part in content)
    raise RequestError("message content must be a string or a list of parts", "messages")


def _generation(
    kind: Kind, fields: dict[str, Any], key: str, prompt_tokens: int, limit: int
) -> GenerationRequest:
    name = "max_tokens" if fields.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = fields.get(name)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"{name} must be a positive integer", name)
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", "stream")
    options = fields.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage must be a boolean", "stream_options")
    return GenerationRequest(
        kind=kind,
        prompt_key=key,
        prompt_tokens=prompt_tokens,
        max_tokens=min(max_tokens, limit),
        stream=bool(stream),
        include_usage=include_usage,
    )


class ResponseBuilder:
    """Builds the JSON objects of one answer: the whole answer, or its stream chunks."""

    def __init__(self, request: GenerationRequest, model: str) -> None:
        self.request = request
        self.model = model
        chat = request.kind is Kind.CHAT
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = self.request.prompt_tokens
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def full(self, tokens: list[str]) -> dict[str, Any]:
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if self.request.kind is Kind.CHAT:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return self._envelope(self._object, [choice]) | {"usage": self.usage(len(tokens))}

    def role_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def token_chunk(self, token: str) -> dict[str, Any]:
        if self.request.kind is Kind.CHAT:
            return self._chunk({"content": token}, None)
        return self._chunk(token, None)

    def final_chunk(self) -> dict[str, Any]:
        return self._chunk({} if self.request.kind is Kind.CHAT else "", "length")

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        return self._envelope(self._chunk_object, []) | {"usage": self.usage(completion_tokens)}

    def _chunk(self, content: str | dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice["delta" if isinstance(content, dict) else "text"] = content
        chunk = self._envelope(self._chunk_object, [choice])
        if self.request.include_usage:
            chunk["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return chunk

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
