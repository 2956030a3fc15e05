"""The tokenizer generation uses: the data pipeline's own loader, else the tokenizers file.

Training owns tokenization (slope_megatron.data knows each kind's special tokens and
quirks: bpe tokenizer.json, gpt2.tiktoken, hf_tokenizer/), so the artifact keeps the saved
tokenizer under its data-pipeline name and we reload it with the pipeline's
`data.tokenizer.load_saved`. (The public `data.load_tokenizer(dir)` reads a prepared *data*
directory's meta.json, which an artifact is not.) If the data package is unavailable, or a
plain tokenizer.json lacks what it insists on (an `<|endoftext|>` token), we read the JSON
with the `tokenizers` library directly; byte-level BPE round-trips identically either way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .artifact import tokenizer_kind

log = logging.getLogger(__name__)

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")


class FileTokenizer:
    """encode/decode/vocab_size/eos_id over a `tokenizers` JSON file (no special tokens added)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for bad JSON
            raise ValueError(f"cannot read tokenizer file '{path}': {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(name) for name in EOS_NAMES]
        self.eos_id: Optional[int] = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: Path):
    """A tokenizer (encode/decode/vocab_size/eos_id) for a saved tokenizer file or directory."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"tokenizer '{path}' does not exist")
    kind = tokenizer_kind(path)
    try:
        from ..data.tokenizer import load_saved
    except ImportError as e:
        if kind != "bpe":
            raise ValueError(f"reading a {kind} tokenizer needs slope_megatron.data ({e})") \
                from None
        return FileTokenizer(path)
    try:
        return load_saved(path.parent, {"kind": kind, "file": path.name, "name": kind})
    except ValueError as e:  # DataError subclasses ValueError
        if kind != "bpe":
            raise
        log.warning("the data pipeline cannot load '%s' (%s); reading it with the tokenizers "
                    "library instead", path, e)
        return FileTokenizer(path)
