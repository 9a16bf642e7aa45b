"""A character n-gram language model: small, real, and pure Python.

Trained at load time on the text shipped beside it (`corpus.txt`), it needs no download, no
tokenizer and no GPU, and generates text one character at a time from the longest context it
has seen (backing off to shorter ones), sampled with a temperature and a seed. It stands in
for the torch or diffusers model a real in-process worker loads (docs/in-process.md): loading
it takes a moment, generating is CPU-bound work that must stay off the event loop.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus.txt"
ORDER = 6
"""The longest context, in characters, the model conditions on."""


@dataclass(frozen=True, slots=True)
class Choices:
    """What may follow one context: its characters and their counts."""

    characters: tuple[str, ...]
    counts: tuple[int, ...]


class CharModel:
    """Counts of the character that follows each context of up to `order` characters."""

    def __init__(self, table: dict[str, Choices], order: int) -> None:
        self.table = table
        self.order = order

    @classmethod
    def train(cls, text: str, order: int = ORDER) -> CharModel:
        """Count every (context, next character) pair of `text`, contexts 0 to `order` long."""
        text = " ".join(text.split())
        counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for index, character in enumerate(text):
            for length in range(min(order, index) + 1):
                counts[text[index - length : index]][character] += 1
        table = {
            context: Choices(tuple(followers), tuple(followers.values()))
            for context, followers in counts.items()
        }
        return cls(table, order)

    @classmethod
    def load(cls, path: Path = CORPUS, order: int = ORDER) -> CharModel:
        return cls.train(path.read_text(encoding="utf-8"), order)

    def generate(
        self, prompt: str, max_tokens: int, temperature: float = 0.8, seed: int | None = None
    ) -> Iterator[str]:
        """Up to `max_tokens` characters that follow `prompt`, one at a time."""
        sampler = random.Random(seed)
        context = " ".join(prompt.split())[-self.order :]
        for _ in range(max_tokens):
            choices = self._choices(context)
            character = _pick(choices, temperature, sampler)
            yield character
            context = (context + character)[-self.order :]

    def _choices(self, context: str) -> Choices:
        for start in range(len(context) + 1):
            found = self.table.get(context[start:])
            if found is not None:
                return found
        return self.table[""]


def _pick(choices: Choices, temperature: float, sampler: random.Random) -> str:
    if temperature <= 0:
        return choices.characters[max(range(len(choices.counts)), key=choices.counts.__getitem__)]
    weights = [count ** (1.0 / temperature) for count in choices.counts]
    cumulative = list(itertools.accumulate(weights))
    return sampler.choices(choices.characters, cum_weights=cumulative)[0]
