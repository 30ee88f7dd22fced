"""CLIP tokenizers without network access.

The BPE vocabulary CLIP was trained with ships inside the open-clip wheel
(`bpe_simple_vocab_16e6.txt.gz`); from it we build the same vocabulary and merges that the
hub tokenizers contain, so token ids match real CLIP exactly. This module does not import torch:
the API process uses it to validate prompts.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_CONTEXT_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Merges used by CLIP: the first 49152 - 256 - 2 lines after the header of the vocabulary file.
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def bundled_bpe_path() -> Path:
    """Location of open-clip's BPE file, found without importing open_clip (it needs extras)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "open-clip-torch is not installed; run `make install` (it provides the CLIP BPE vocabulary)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


@cache
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(bundled_bpe_path(), "rt", encoding="utf-8") as bpe_file:
        lines = bpe_file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A real CLIP tokenizer built offline.

    `pad_token` is `<|endoftext|>` for CLIP ViT-L and `!` for the OpenCLIP bigG tokenizer that
    SDXL pairs with it.
    """
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_CONTEXT_LENGTH,
    )


def load_clip_tokenizer(path: str | Path | None = None, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Tokenizer from a hub-style directory when given, else the offline-built one."""
    if path is not None:
        return CLIPTokenizer.from_pretrained(str(path))
    return build_clip_tokenizer(pad_token)
