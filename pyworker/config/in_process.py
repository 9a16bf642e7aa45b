"""A model loaded in the worker's own process, and Python functions as its routes.

With no model server, the template author names what loads the model (an async context
manager, or a setup and teardown pair) and a function per route. The worker enters the
context manager once, at start (readiness is "entered", then the benchmark, then READY), and
exits it once, on drain or shutdown, after the requests in flight have finished; a route's
function gets the payload and returns its answer. docs/in-process.md shows a whole worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

RouteFunction: TypeAlias = Callable[[dict[str, Any]], Any]
"""`function(payload)`, async or sync: returns a JSON-able result, `bytes`, a `HandlerResult`
(status, body, content type), or an iterator of chunks (async, or a sync generator) to stream.
A sync function runs in the worker's bounded thread pool, never on the event loop."""

ModelLifecycle: TypeAlias = (
    AbstractAsyncContextManager[Any] | Callable[[], AbstractAsyncContextManager[Any]]
)
"""An async context manager that loads the model on enter and frees it on exit, or a function
that makes one (an `@asynccontextmanager` function, a class)."""

Setup: TypeAlias = Callable[[], Awaitable[None] | None]
"""`setup()` loads the model, `teardown()` frees it: async, or sync (run in a thread)."""


def check_lifecycle(value: object) -> object:
    """A lifecycle must be an async context manager or something that makes one."""
    if _is_async_manager(value) or callable(value):
        return value
    if hasattr(value, "__enter__"):
        raise ValueError(
            "is a plain (sync) context manager: pyworker needs an async one (async def "
            "__aenter__/__aexit__, or @contextlib.asynccontextmanager); or give setup= "
            "and teardown= functions instead"
        )
    raise ValueError(
        "must be an async context manager (with __aenter__ and __aexit__, e.g. made by "
        "@contextlib.asynccontextmanager) or a function returning one"
    )


def _is_async_manager(value: object) -> bool:
    return hasattr(value, "__aenter__") and hasattr(value, "__aexit__")


def make_manager(lifecycle: ModelLifecycle) -> AbstractAsyncContextManager[Any]:
    """The context manager to enter: the lifecycle itself, or what its factory makes."""
    if _is_async_manager(lifecycle) and not inspect.isclass(lifecycle):
        return lifecycle  # type: ignore[return-value]
    assert callable(lifecycle)
    made = lifecycle()
    if not _is_async_manager(made):
        raise TypeError(
            f"lifecycle {describe_callable(lifecycle)} returned {type(made).__name__}, "
            "not an async context manager"
        )
    return made


def pair_manager(setup: Setup, teardown: Setup | None) -> ModelLifecycle:
    """A setup and teardown pair as a lifecycle: teardown runs only after setup succeeded."""

    @contextlib.asynccontextmanager
    async def loaded() -> AsyncIterator[None]:
        await _run(setup)
        try:
            yield
        finally:
            if teardown is not None:
                await _run(teardown)

    return loaded


async def _run(step: Setup) -> None:
    if inspect.iscoroutinefunction(step):
        await step()
        return
    # A sync load (Cog's `setup()`, a torch model) would stall health and reports.
    result = await asyncio.to_thread(step)
    if inspect.isawaitable(result):
        await result


def lifecycle_name(lifecycle: object) -> str:
    """How error messages name the lifecycle: its function's, method's or class's name."""
    return describe_callable(lifecycle)


def describe_callable(value: object) -> str:
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    return str(name) if name else type(value).__qualname__
