"""pyworker.backports: on Python 3.10 the same behaviour as the 3.11 standard library's."""

from __future__ import annotations

import asyncio
import json
from enum import auto

import pytest

from pyworker.backports import StrEnum, timeout


class Color(StrEnum):
    RED = "red"
    DARK_BLUE = auto()


def test_str_enum_members_are_their_value_as_strings() -> None:
    value: str = Color.RED
    assert value == "red"
    assert isinstance(Color.RED, str)
    assert str(Color.RED) == "red"
    assert f"{Color.RED}" == "red"
    assert f"{Color.RED:>5}" == "  red"
    assert Color.DARK_BLUE.value == "dark_blue"
    assert json.dumps({"color": Color.RED}) == '{"color": "red"}'
    assert Color("red") is Color.RED


async def test_timeout_raises_asyncio_timeout_error_and_leaves_fast_work_alone() -> None:
    async with timeout(5):
        await asyncio.sleep(0)
    with pytest.raises(asyncio.TimeoutError):
        async with timeout(0.01):
            await asyncio.Event().wait()
    async with timeout(None):
        await asyncio.sleep(0)
