"""Reference hooks that change how a route answers, as pyworker route handlers and functions.

A route's `handler` (pyworker.config.ModelHandler) replaces the plain forward, on the request
path and in the benchmark alike: the reference's `response_generator` fits that shape. Its
`remote_function`, a model in the worker's own process, is a route `function`
(pyworker.config.RouteFunction).
"""

from __future__ import annotations

import functools
import inspect
from types import CodeType
from typing import Any

from aiohttp import ClientResponse, ClientSession, web

from pyworker.compat.reference import ClientResponseGenerator
from pyworker.config import HandlerResult, JSONObject, ModelHandler, RouteFunction
from pyworker.upstream.functions import is_async


class RemoteFunctionFailed(RuntimeError):
    """The remote function raised: a 500, whatever it raised, as in the reference."""


def remote_function_route(route: str, function: Any) -> RouteFunction:
    """The reference's remote dispatch: `function(**payload)`, answered as `{"result": ...}`.

    An async function runs on the loop (a client hang-up cancels it); a sync one, which the
    reference would fail on, runs in the worker's thread pool."""
    if is_async(function):

        async def call(payload: JSONObject) -> JSONObject:
            try:
                result = await function(**payload)
            except Exception as error:
                raise RemoteFunctionFailed(f"remote function of {route} raised") from error
            return {"result": result}

        return call

    def call_sync(payload: JSONObject) -> JSONObject:
        try:
            result = function(**payload)
        except Exception as error:
            raise RemoteFunctionFailed(f"remote function of {route} raised") from error
        return {"result": result}

    return call_sync


STREAMING_NAMES = frozenset({"prepare", "StreamResponse", "FileResponse"})
"""Names a generator's code uses only to stream on the client's connection itself."""


def streams(generator: Any) -> bool:
    """Whether a `response_generator` streams its answer itself, read from its code: an async
    generator, or code (its own or a nested function's) naming `prepare` or `StreamResponse`.

    Found at start, the worker is refused (exit 2) instead of failing every benchmark; a
    generator that streams through a helper defined elsewhere still gets a 500 at request
    time (`StreamingGeneratorError`)."""
    function = _function(generator)
    if inspect.isasyncgenfunction(function):
        return True
    code = getattr(function, "__code__", None)
    return isinstance(code, CodeType) and not STREAMING_NAMES.isdisjoint(_names(code))


def _function(generator: Any) -> Any:
    while isinstance(generator, functools.partial):
        generator = generator.func
    generator = inspect.unwrap(generator)
    if inspect.ismethod(generator):
        return generator.__func__
    if not inspect.isfunction(generator) and callable(generator):
        return type(generator).__call__
    return generator


def _names(code: CodeType) -> set[str]:
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= _names(constant)
    return names


class StreamingGeneratorError(RuntimeError):
    """A `response_generator` tried to stream its answer itself."""


class _NoClientRequest:
    """Stands in for the client's request: pyworker answers the client itself, so a generator
    may build a `web.Response` but cannot `prepare()` a stream on the client's connection."""

    def __getattr__(self, name: str) -> Any:
        raise StreamingGeneratorError(
            "HandlerConfig.response_generator used the client request "
            f"(.{name}): pyworker relays streams itself; drop the response_generator of a "
            "streaming route, or return a web.Response built from the model's answer"
        )


def response_generator_handler(route: str, generator: ClientResponseGenerator) -> ModelHandler:
    """Post the payload to `route`, then let the reference generator shape the answer."""

    async def call(session: ClientSession, base_url: str, payload: JSONObject) -> HandlerResult:
        async with session.post(base_url + route, json=payload) as model_response:
            answer = await generator(_client_request(), model_response)
            return await _result(answer, model_response)

    return call


def _client_request() -> web.Request:
    stand_in: Any = _NoClientRequest()
    return stand_in  # type: ignore[no-any-return]


async def _result(answer: object, model_response: ClientResponse) -> HandlerResult:
    if not isinstance(answer, web.Response):
        raise StreamingGeneratorError(
            f"HandlerConfig.response_generator returned {type(answer).__name__}: pyworker "
            "needs a web.Response (streams are relayed by pyworker itself)"
        )
    body = answer.body
    if body is None:
        body = b""
    if not isinstance(body, bytes | bytearray):
        raise StreamingGeneratorError(
            "HandlerConfig.response_generator returned a web.Response whose body is not bytes"
        )
    content_type = answer.content_type or model_response.content_type or "application/json"
    if answer.charset and "charset" not in content_type:
        content_type += f"; charset={answer.charset}"
    return HandlerResult(answer.status, bytes(body), content_type)
