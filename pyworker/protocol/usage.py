"""Token counts an OpenAI-style answer reports in its `usage` object.

OpenAI's API and the servers that copy it (vLLM, SGLang, llama-server, the demo) end a whole
answer, or a stream's last chunk, with `usage: {prompt_tokens, completion_tokens,
total_tokens}`. Workers count produced work from it, and `pyworker load` the tokens served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def usage_count(document: Mapping[str, Any], name: str) -> float | None:
    """`usage.<name>` of an answer or stream chunk; None unless it is a count (a number >= 0)."""
    usage = document.get("usage")
    value = usage.get(name) if isinstance(usage, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value >= 0 and math.isfinite(value) else None


def completion_tokens(document: Mapping[str, Any]) -> float | None:
    """The tokens the answer says the model generated."""
    return usage_count(document, "completion_tokens")


def processed_tokens(document: Mapping[str, Any]) -> float | None:
    """The tokens the answer says were processed: prompt plus completion, else the total.

    Chat streams carry `usage` only when asked (`stream_options.include_usage`), and so do
    vLLM's and SGLang's completions streams; llama-server always ends a completions stream
    with it. Chunks without it give None.
    """
    prompt = usage_count(document, "prompt_tokens")
    completion = completion_tokens(document)
    if prompt is not None and completion is not None:
        return prompt + completion
    return usage_count(document, "total_tokens")
