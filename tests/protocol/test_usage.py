"""Token counts from an OpenAI-style `usage`: one reading for workers and `pyworker load`."""

from __future__ import annotations

import pytest

from pyworker.protocol.usage import completion_tokens, processed_tokens


def test_processed_tokens_are_prompt_plus_completion_else_the_total() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 99}
    assert processed_tokens({"usage": usage}) == 7
    assert processed_tokens({"usage": {"completion_tokens": 4, "total_tokens": 9}}) == 9
    assert completion_tokens({"usage": usage}) == 4


@pytest.mark.parametrize(
    "usage",
    [None, "12", {}, {"completion_tokens": True}, {"completion_tokens": -1}, [4]],
)
def test_anything_but_a_count_is_no_count(usage: object) -> None:
    assert completion_tokens({"usage": usage}) is None
    assert processed_tokens({"usage": usage}) is None
    assert completion_tokens({}) is None
