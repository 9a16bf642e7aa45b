"""A hook may be a plain function or a coroutine function; callers get its value either way."""

from __future__ import annotations

from pyworker.config.hooks import call_hook


def double(value: int) -> int:
    return value * 2


async def double_later(value: int) -> int:
    return value * 2


async def test_a_plain_hook_and_a_coroutine_hook_give_the_same_value() -> None:
    assert await call_hook(double, 21) == 42
    assert await call_hook(double_later, 21) == 42


async def test_a_hook_takes_every_argument_in_order() -> None:
    assert await call_hook(lambda status, body: (status, body), 200, b"x") == (200, b"x")
