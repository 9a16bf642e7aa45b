"""Python 3.11 standard-library features, for Python 3.10.

Vast's start script makes a Python 3.10 venv, so pyworker runs there. Code that would use
`enum.StrEnum` or `asyncio.timeout` takes them from here: the standard library's on 3.11 and
later, equivalents (`async-timeout` from PyPI) on 3.10. Timeouts from asyncio raise
`asyncio.TimeoutError`, which is not the builtin `TimeoutError` before 3.11: catch
`asyncio.TimeoutError` (both, where a socket's own timeout can arrive too).
"""

from __future__ import annotations

import enum
import sys

__all__ = ["StrEnum", "timeout"]

if sys.version_info >= (3, 11):
    from asyncio import timeout
    from enum import StrEnum
else:
    from async_timeout import timeout

    class StrEnum(str, enum.Enum):
        """`enum.StrEnum`: members are strings, and `str()` and f-strings give the value."""

        def __str__(self) -> str:
            return str(self.value)

        @staticmethod
        def _generate_next_value_(name: str, start: int, count: int, last_values: list[str]) -> str:
            return name.lower()
