"""Calling a hook a template author wrote, which may be a plain function or a coroutine one.

The request and response hooks (pyworker.config.worker) and the body encoder
(pyworker.config.encoded_body) may each be either; their callers await what needs it here.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast, overload

Result = TypeVar("Result")


@overload
async def call_hook(hook: Callable[..., Awaitable[Result]], *arguments: Any) -> Result: ...


@overload
async def call_hook(hook: Callable[..., Result | Awaitable[Result]], *arguments: Any) -> Result: ...


async def call_hook(hook: Callable[..., Result | Awaitable[Result]], *arguments: Any) -> Result:
    """`hook(*arguments)`, awaited when it returned an awaitable."""
    result = hook(*arguments)
    if inspect.isawaitable(result):
        return cast(Result, await result)
    return result
