"""Tokenizers behind one small interface, built for a dataset and saved beside its shards.

Three kinds (``data.tokenizer``):

* ``bpe``: a byte-level BPE trained locally with ``tokenizers`` on the training split. It
  needs nothing from outside, round-trips any text exactly, and is the default.
* ``tiktoken-gpt2``: GPT-2's BPE read from a local ``gpt2.tiktoken`` file
  (``tiktoken.get_encoding('gpt2')`` would download it, which fails offline).
* ``hf:<name>``: any Hugging Face tokenizer, by hub name or local directory. Offline,
  ``transformers`` can hand back a tokenizer with an EMPTY vocabulary instead of failing,
  so the vocabulary size is checked and an empty one stops the run.

Whatever the kind, a copy is saved in the data directory and ``meta.json`` says how to
load it, so a prepared dataset and its tokenizer always travel together.
"""
from __future__ import annotations

import abc

import base64
import binascii
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import DataError

EOS_TOKEN = "<|endoftext|>"
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class Tokenizer(abc.ABC):
    """encode/decode plus the two numbers the model and the shards need."""
    name: str
    vocab_size: int
    eos_id: int
    kind: str
    file: str            # name of the saved copy inside the data directory

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, " \
               f"eos_id={self.eos_id})"


def _check_vocab(name: str, size: int, what_to_do: str) -> None:
    if size <= 0:
        raise DataError(f"tokenizer '{name}' has an empty vocabulary (0 tokens); {what_to_do}")


# ---- byte-level BPE (tokenizers) --------------------------------------------------------

class BPETokenizer(Tokenizer):
    kind = "bpe"
    file = "tokenizer.json"

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.name = name = f"bpe-{self.vocab_size}"
        _check_vocab(name, self.vocab_size, "delete the data directory and prepare it again")
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise DataError(f"tokenizer '{name}' has no '{EOS_TOKEN}' token; delete the data "
                            "directory and prepare it again")
        self.eos_id = eos

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTok
        try:
            tok = HFTok.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for bad files
            raise DataError(f"cannot load tokenizer file '{path}' ({e}); delete its data "
                            "directory and prepare the data again") from None
        return cls(tok)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int, length: Optional[int] = None,
              progress: bool = True) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress and sys.stderr.isatty())
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    def save(self, directory: Path) -> Path:
        path = directory / self.file
        self._tok.save(str(path))
        return path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


# ---- GPT-2 BPE (tiktoken, local file) ---------------------------------------------------

def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """Parse '<base64 token> <rank>' lines (tiktoken's loader would cache by path name)."""
    ranks = {}
    try:
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, ValueError, binascii.Error) as e:
        where = f"line {lineno} of " if "lineno" in locals() else ""
        raise DataError(f"{where}tiktoken file '{path}' is unreadable ({type(e).__name__}); it "
                        "must hold one '<base64 token> <rank>' pair per line") from None
    return ranks


class TiktokenGPT2(Tokenizer):
    kind = "tiktoken-gpt2"
    file = "gpt2.tiktoken"

    def __init__(self, path: Path):
        try:
            import tiktoken
        except ImportError:
            raise DataError("data.tokenizer=tiktoken-gpt2 needs the tiktoken package: "
                            "pip install tiktoken (or use data.tokenizer=bpe)") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tiktoken file '{self.path}' does not exist; set data.tiktoken_file "
                            "to a local gpt2.tiktoken (tiktoken cannot download it offline) or "
                            "use data.tokenizer=bpe")
        ranks = read_tiktoken_file(self.path)
        _check_vocab(f"tiktoken-gpt2 ({self.path})", len(ranks),
                     "data.tiktoken_file must be a non-empty gpt2.tiktoken")
        try:
            from tiktoken_ext.openai_public import r50k_pat_str as pattern
        except ImportError:
            pattern = GPT2_PATTERN
        n = max(ranks.values()) + 1
        self._enc = tiktoken.Encoding(name="gpt2-local", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={EOS_TOKEN: n})
        self.name = "tiktoken-gpt2"
        self.eos_id = n
        self.vocab_size = self._enc.n_vocab

    @classmethod
    def load(cls, path: Path) -> "TiktokenGPT2":
        return cls(path)

    def save(self, directory: Path) -> Path:
        dest = directory / self.file
        shutil.copyfile(self.path, dest)
        return dest

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))


# ---- Hugging Face (transformers) --------------------------------------------------------

class HFTokenizer(Tokenizer):
    kind = "hf"
    file = "hf_tokenizer"

    def __init__(self, name_or_dir: str, display_name: Optional[str] = None):
        self.name = display_name or f"hf:{name_or_dir}"
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f"data.tokenizer={self.name} needs the transformers package: pip "
                            "install transformers (or use data.tokenizer=bpe)") from None
        try:
            tok = AutoTokenizer.from_pretrained(name_or_dir)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"could not load Hugging Face tokenizer '{name_or_dir}' "
                            f"({type(e).__name__}: {first}); a model hub must be reachable, or "
                            "use data.tokenizer=bpe / tiktoken-gpt2") from None
        try:
            size = len(tok.get_vocab())
        except Exception:
            size = 0
        _check_vocab(self.name, size, "the model hub was probably unreachable and transformers "
                     "returned a placeholder; use data.tokenizer=bpe (trained locally) or "
                     "tiktoken-gpt2 with a local file")
        if tok.eos_token_id is None:
            raise DataError(f"tokenizer '{self.name}' defines no EOS token, which separates "
                            "documents in the shards; choose another tokenizer or "
                            "data.tokenizer=bpe")
        tok.model_max_length = sys.maxsize       # we tokenize whole documents, not model inputs
        self._tok = tok
        self.eos_id = int(tok.eos_token_id)
        self.vocab_size = max(len(tok), max(tok.get_vocab().values()) + 1)

    @classmethod
    def load(cls, path: Path, name: str) -> "HFTokenizer":
        if not path.is_dir():
            raise DataError(f"saved tokenizer '{path}' is missing; delete its data directory "
                            "and prepare the data again")
        return cls(str(path), display_name=name)

    def save(self, directory: Path) -> Path:
        dest = directory / self.file
        self._tok.save_pretrained(str(dest))
        return dest

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def build_tokenizer(kind: str, *, train_texts, vocab_size: int, tiktoken_file: Optional[str],
                    n_docs: Optional[int] = None, progress: bool = True) -> Tokenizer:
    """A tokenizer for a new dataset; ``train_texts()`` yields the training documents."""
    if kind == "bpe":
        return BPETokenizer.train(train_texts(), vocab_size, length=n_docs, progress=progress)
    if kind == "tiktoken-gpt2":
        if not tiktoken_file:
            raise DataError("data.tokenizer=tiktoken-gpt2 needs data.tiktoken_file, the path of "
                            "a local gpt2.tiktoken file; or use data.tokenizer=bpe")
        return TiktokenGPT2(Path(tiktoken_file).expanduser())
    if kind.startswith("hf:") and len(kind) > 3:
        return HFTokenizer(kind[3:])
    raise DataError(f"data.tokenizer '{kind}' is unknown; use 'bpe', 'tiktoken-gpt2' or "
                    "'hf:<name>'")


def load_saved(directory: Path, spec: dict) -> Tokenizer:
    """Reload the tokenizer a data directory's meta.json describes."""
    kind, path = spec.get("kind"), directory / spec.get("file", "")
    if kind != "hf" and not path.is_file():
        raise DataError(f"tokenizer file '{path}' is missing; delete '{directory}' and prepare "
                        "the data again")
    if kind == "bpe":
        return BPETokenizer.load(path)
    if kind == "tiktoken-gpt2":
        return TiktokenGPT2.load(path)
    if kind == "hf":
        return HFTokenizer.load(path, spec.get("name", "hf"))
    raise DataError(f"'{directory}/meta.json' names an unknown tokenizer kind {kind!r}; "
                    "delete the directory and prepare the data again")
