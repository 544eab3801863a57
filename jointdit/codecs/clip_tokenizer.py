"""The real 49408-token CLIP BPE tokenizer, rebuilt offline from the vocabulary shipped in the repo.

`jointdit/assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI/open_clip's merge list (MIT, see
`LICENSE-open_clip-bpe.txt` beside it). The vocabulary is built the way open_clip builds it:
the 256 byte symbols, the same with `</w>`, the 48894 merges joined, then the two specials.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_PATH = Path(__file__).resolve().parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # open_clip keeps the first 48894 merges of the file
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges as 'a b' strings), identical to open_clip's SimpleTokenizer."""
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer with the real vocabulary and `model_max_length` tokens per prompt."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=max_length
    )


def tiny_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The same byte-level scheme without merges (every byte a token, 514 ids): a tokenizer
    for tiny test models that builds in milliseconds."""
    symbols = list(_bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length
    )
