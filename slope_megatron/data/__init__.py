"""Data pipeline: text -> tokenizer -> memory-mapped token shards with a held-out split.

The trainer's entry points are :func:`prepare_data` (idempotent, cached, lock-safe),
:class:`TokenDataset` and :func:`load_tokenizer`. Every user-fixable problem raises
:class:`DataError` with a message that names the thing and what to do. docs/DATA.md
describes the default corpus and the cache layout.
"""
from .dataset import TokenDataset
from .errors import DataError
from .prepare import DataInfo, load_tokenizer, prepare_data

__all__ = ["prepare_data", "TokenDataset", "DataInfo", "DataError", "load_tokenizer"]
