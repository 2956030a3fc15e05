"""Turn a user's data path (a text file, a JSONL file, or a directory of them) into documents.

A *document* is the unit the validation split holds out and the unit an EOS token closes:
a whole plain-text file, or one JSONL line's ``text`` field. Reading is streamed and
repeatable (the pipeline makes one pass to count and checksum, one to train the tokenizer,
one to tokenize), so corpora larger than memory work. Text is normalised the same way
everywhere: UTF-8, no BOM, ``\\n`` line ends, Unicode NFC, surrounding whitespace stripped;
documents that are empty after that are skipped.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
# single files with these endings are refused, not read as text (structured or compressed)
UNREAD_SUFFIXES = (".json", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".parquet", ".arrow",
                   ".pdf")
WHAT_TO_DO = "set data.path to a text file, a JSONL file (one {\"text\": ...} per line) " \
             "or a directory of .txt/.jsonl files"


def normalise(text: str) -> str:
    """Canonical form of one document (see module docstring)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (bad byte at offset {e.start}); convert it "
                        "to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it") from None


def _open(path: Path):
    try:
        return open(path, "rb")
    except PermissionError:
        raise DataError(f"cannot read data file '{path}': permission denied; make it readable "
                        "or point data.path elsewhere") from None
    except OSError as e:
        raise DataError(f"cannot read data file '{path}': {e.strerror or e}; "
                        f"{WHAT_TO_DO}") from None


def list_source_files(path: Path) -> list[Path]:
    """The files a data path stands for, in a fixed (sorted) order."""
    if not path.exists():
        raise DataError(f"data.path '{path}' does not exist; {WHAT_TO_DO}, or leave data.path "
                        "unset for the built-in English corpus")
    if path.is_file():
        unread = next((x for x in UNREAD_SUFFIXES if path.name.lower().endswith(x)), None)
        if unread is not None:  # read as text it would train on JSON syntax or fail as binary
            raise DataError(f"data.path '{path}' is a {unread} file, which is not read: give "
                            f"plain text ({', '.join(TEXT_SUFFIXES)} or any other name) or JSON "
                            f"Lines ({', '.join(JSONL_SUFFIXES)}, one {{\"text\": ...}} object a "
                            f"line), uncompressed")
        return [path]
    if not path.is_dir():
        raise DataError(f"data.path '{path}' is neither a file nor a directory; {WHAT_TO_DO}")
    try:
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    except PermissionError as e:
        raise DataError(f"cannot list data directory '{e.filename or path}': permission denied; "
                        "make it readable or point data.path elsewhere") from None
    if not files:
        raise DataError(f"data directory '{path}' holds no .txt, .text, .md or .jsonl files; "
                        f"{WHAT_TO_DO}")
    return files


def iter_file_documents(path: Path, hasher: Optional["hashlib._Hash"] = None) -> Iterator[str]:
    """Normalised, non-empty documents of one file; feeds its raw bytes to ``hasher``.

    JSONL is streamed line by line, so one huge JSONL file never has to fit in memory.
    """
    with _open(path) as f:
        if path.suffix.lower() in JSONL_SUFFIXES:
            for lineno, line in enumerate(f, 1):
                if hasher is not None:
                    hasher.update(line)
                if line.strip():
                    doc = _jsonl_document(line, f"line {lineno} of '{path}'")
                    if doc:
                        yield doc
        else:
            data = f.read()
            if hasher is not None:
                hasher.update(data)
            doc = normalise(decode_utf8(data, f"data file '{path}'"))
            if doc:
                yield doc


def _jsonl_document(line: bytes, where: str) -> str:
    try:
        obj = json.loads(decode_utf8(line, where))
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}); each line must be a JSON "
                        "object with a 'text' string") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{where} has no 'text' string field; each line must be a JSON "
                        "object like {\"text\": \"...\"}")
    return normalise(obj["text"])


@dataclass
class SourceFile:
    path: str
    bytes: int
    sha256: str
    documents: int


class TextCorpus:
    """The documents behind a data path, iterable any number of times in the same order."""

    def __init__(self, path: Path, label: Optional[str] = None):
        self.root = Path(path)
        self.label = label or str(self.root)
        self.files = list_source_files(self.root)

    def __iter__(self) -> Iterator[str]:
        for f in self.files:
            yield from iter_file_documents(f)

    def fingerprint(self) -> list:
        """Cheap identity of the sources (name, size, mtime) to notice edits since caching."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append([self._rel(f), st.st_size, st.st_mtime_ns])
        return out

    def scan(self, progress=None) -> list[SourceFile]:
        """One full pass: validates every file, counts documents, checksums the sources."""
        out = []
        for f in self.files:
            h = hashlib.sha256()
            n = sum(1 for _ in iter_file_documents(f, h))
            out.append(SourceFile(self._rel(f), f.stat().st_size, h.hexdigest(), n))
            if progress is not None:
                progress.update(1)
        return out

    def _rel(self, f: Path) -> str:
        return f.name if self.root.is_file() else str(f.relative_to(self.root))
