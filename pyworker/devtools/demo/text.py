"""Deterministic pseudo-text for the demo model server.

The same prompt always yields the same words, so tests can compare a streamed answer with a
plain one; one word is one "token", which makes usage counts exact and easy to check.
"""

from __future__ import annotations

import hashlib
import random

WORDS = (
    "the", "model", "is", "a", "stand-in", "for", "real", "inference", "and", "it", "writes",
    "plain", "words", "at", "a", "steady", "pace", "so", "that", "workers", "can", "measure",
    "throughput", "queues", "streams", "and", "load", "without", "any", "GPU", "weights",
    "tokens", "flow", "from", "prompt", "to", "answer", "while", "the", "autoscaler", "routes",
    "requests", "across", "ready", "machines", "latency", "stays", "low", "when", "capacity",
    "grows", "quickly", "under", "pressure", "every", "request", "gets", "its", "share",
)  # fmt: skip


def generate_tokens(prompt_key: str, count: int) -> list[str]:
    """`count` tokens, each a space and a word, chosen by a generator seeded from the prompt."""
    seed = int.from_bytes(hashlib.sha256(prompt_key.encode()).digest()[:8], "big")
    chooser = random.Random(seed)
    return [" " + chooser.choice(WORDS) for _ in range(count)]


def count_prompt_tokens(text: str) -> int:
    """An approximate prompt length in tokens: whitespace-separated words, at least one."""
    return max(len(text.split()), 1)
