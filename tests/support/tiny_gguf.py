"""Write a tiny random-weight llama model in GGUF, so a real llama-server can run in CI offline.

The weights are random but shaped so that every completion is printable text that runs to
exactly `max_tokens`: hidden dimension 0 of every embedding is a constant 1.0 that no layer
writes to, the final norm scales it by 100, and the output head adds it to printable tokens
and subtracts it from control and byte tokens. So EOS never wins, and the answer's length is
known in advance, which is what the tests compare. The same arguments give the same bytes.

    python tests/support/tiny_gguf.py tiny.gguf
    python tests/support/tiny_gguf.py slow.gguf --n-embd 512 --n-layer 8 --n-head 8 \
        --n-ff 1536 --n-ctx 2048      # ~110 MB, a few hundred tokens/s on one core
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

SPACE = "\u2581"  # SentencePiece's word-boundary mark, which llama.cpp turns into a space
MERGES = (
    "\u2581t",
    "\u2581a",
    "he",
    "ll",
    "lo",
    "or",
    "ld",
    "in",
    "er",
    "th",
    "\u2581w",
    "\u2581h",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONTROL_TOKENS = 3  # <unk>, <s>, </s>
BYTE_TOKENS = 256


@dataclass(frozen=True, slots=True)
class ModelShape:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 256
    seed: int = 1234

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


TINY = ModelShape()
SLOW = ModelShape(n_embd=512, n_layer=8, n_head=8, n_ff=1536, n_ctx=2048)
"""Slow enough on one core (a few hundred tokens/s) for streams that overlap or get cut."""


@dataclass(frozen=True, slots=True)
class Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]

    @property
    def printable(self) -> npt.NDArray[np.bool_]:
        return np.array([kind == gguf.TokenType.NORMAL for kind in self.types])


def vocabulary() -> Vocabulary:
    """A SentencePiece-style vocabulary: controls, byte fallbacks, characters, a few merges."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    scores = [0.0, 0.0, 0.0]
    for byte in range(BYTE_TOKENS):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    characters = [SPACE] + [c for c in string.printable if c.isprintable() and c != " "]
    for index, character in enumerate(characters):
        tokens.append(character)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1.0 if index == 0 else -2.0)
    for merge in MERGES:
        tokens.append(merge)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-0.5)
    return Vocabulary(tokens, scores, [int(kind) for kind in types])


def tensors(shape: ModelShape, words: Vocabulary) -> dict[str, npt.NDArray[np.float32]]:
    """The weights, in numpy (rows = outputs) order; gguf reverses them into ggml's order."""
    random = np.random.default_rng(shape.seed)
    vocab, embd, ff = len(words.tokens), shape.n_embd, shape.n_ff

    def linear(outputs: int, inputs: int) -> npt.NDArray[np.float32]:
        scale = 1.0 / np.sqrt(inputs)
        weights: npt.NDArray[np.float32] = random.standard_normal((outputs, inputs)).astype(
            np.float32
        )
        scaled: npt.NDArray[np.float32] = weights * np.float32(scale)
        return scaled

    def ones(size: int) -> npt.NDArray[np.float32]:
        return np.ones(size, dtype=np.float32)

    embedding = random.standard_normal((vocab, embd)).astype(np.float32)
    embedding[:, 0] = 1.0  # the constant dimension that steers the output head
    weights = {"token_embd.weight": embedding}
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}."
        attention_out = linear(embd, embd)
        attention_out[0, :] = 0.0  # nothing writes to dimension 0
        down = linear(embd, ff)
        down[0, :] = 0.0
        weights |= {
            prefix + "attn_norm.weight": ones(embd),
            prefix + "attn_q.weight": linear(embd, embd),
            prefix + "attn_k.weight": linear(embd, embd),
            prefix + "attn_v.weight": linear(embd, embd),
            prefix + "attn_output.weight": attention_out,
            prefix + "ffn_norm.weight": ones(embd),
            prefix + "ffn_gate.weight": linear(ff, embd),
            prefix + "ffn_up.weight": linear(ff, embd),
            prefix + "ffn_down.weight": down,
        }
    final_norm = ones(embd)
    final_norm[0] = 100.0
    head = linear(vocab, embd)
    head[:, 0] = np.where(words.printable, 1.0, -1.0)
    weights["output_norm.weight"] = final_norm
    weights["output.weight"] = head
    return weights


def write_model(path: Path | str, shape: ModelShape = TINY) -> Path:
    """Write the model to `path` (about 0.5 MB for TINY) and return the path."""
    path = Path(path)
    words = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-random-llama-{shape.n_embd}x{shape.n_layer}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(words.tokens))
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10_000.0)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(words.tokens)
    writer.add_token_scores(words.scores)
    writer.add_token_types(words.types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in tensors(shape, words).items():
        writer.add_tensor(name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    for name in ("n_embd", "n_layer", "n_head", "n_ff", "n_ctx", "seed"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(TINY, name))
    arguments = parser.parse_args(argv)
    shape = ModelShape(
        n_embd=arguments.n_embd,
        n_layer=arguments.n_layer,
        n_head=arguments.n_head,
        n_ff=arguments.n_ff,
        n_ctx=arguments.n_ctx,
        seed=arguments.seed,
    )
    if shape.n_embd % shape.n_head:
        parser.error("--n-embd must be a multiple of --n-head")
    written = write_model(arguments.path, shape)
    print(f"{written} {written.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
