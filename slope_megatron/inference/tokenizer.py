"""The tokenizer generation uses: the data pipeline's loader, else the plain tokenizers file.

Training owns tokenization (slope_megatron.data.load_tokenizer knows its special tokens and
any wrapping), so we ask it first. The artifact always carries a `tokenizer.json`, so when
the data package is absent or cannot read the directory we fall back to HF `tokenizers`
directly - what was trained with a byte-level BPE round-trips identically either way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")


class FileTokenizer:
    """encode/decode/vocab_size/eos_id over a `tokenizers` JSON file."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for bad JSON
            raise ValueError(f"cannot read tokenizer file '{path}': {e}") from None
        self.vocab_size = self._tok.get_vocab_size()
        ids = [self._tok.token_to_id(name) for name in EOS_NAMES]
        self.eos_id: Optional[int] = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(tokenizer_file: Path):
    """A tokenizer for `tokenizer_file` (a tokenizer.json, usually inside an artifact)."""
    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise ValueError(f"tokenizer file '{tokenizer_file}' does not exist")
    try:
        from ..data import load_tokenizer as data_load_tokenizer
    except ImportError:
        data_load_tokenizer = None
    if data_load_tokenizer is not None:
        try:
            return data_load_tokenizer(tokenizer_file.parent)
        except Exception as e:  # noqa: BLE001 - fall back, but say why
            log.warning("slope_megatron.data.load_tokenizer(%s) failed (%s); reading %s with "
                        "the tokenizers library instead", tokenizer_file.parent, e,
                        tokenizer_file)
    return FileTokenizer(tokenizer_file)
