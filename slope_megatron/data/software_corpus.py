"""Software documentation and Python sources from two pinned sdists: the 'extended' corpus's
addition to the default one.

Why: the default corpus (14 MB, ~3.3M tokens) is smaller than one GPT-2-small study's token
budget, so a study on it repeats the data for epochs and measures regularisation more than
capacity (docs/RESULTS.md, "Quality"). These two sdists add ~48 MB of text that only PyPI is
needed to fetch, under permissive licences: each project's reST documentation (English
prose with code examples) and its Python sources and tests, one document per file.
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Iterator

from .default_corpus import PinnedPackage


def _tar_documents(archive: Path, pattern: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every file of ``archive`` whose path matches ``pattern`` (sorted by path)."""
    regex = re.compile(pattern)
    with tarfile.open(archive) as t:
        for member in sorted(t.getmembers(), key=lambda m: m.name):
            m = regex.match(member.name)
            if m and member.isfile():
                data = t.extractfile(member).read()
                yield f"{prefix}/{m.group(1)}", data.decode("utf-8", errors="replace")


def extract_django(archive: Path) -> Iterator[tuple[str, str]]:
    # docs/**/*.txt is the reST manual; django/ the library, tests/ its test suite
    return _tar_documents(archive, r"^django-5\.2\.8/((?:docs/.+\.txt)|(?:django|tests)/.+\.py)$",
                          "django")


def extract_sqlalchemy(archive: Path) -> Iterator[tuple[str, str]]:
    # doc/build/**/*.rst is the reST manual (the prebuilt HTML is not used); lib/ and test/ code
    return _tar_documents(
        archive, r"^sqlalchemy-2\.0\.44/((?:doc/build/.+\.rst)|(?:lib/sqlalchemy|test)/.+\.py)$",
        "sqlalchemy")


PACKAGES: tuple[PinnedPackage, ...] = (
    PinnedPackage(
        "Django", "5.2.8", "django-5.2.8.tar.gz",
        "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f", False,
        extract_django, licence="BSD-3-Clause (LICENSE)",
        description="Django's documentation (reST) and Python sources and tests"),
    PinnedPackage(
        "SQLAlchemy", "2.0.44", "sqlalchemy-2.0.44.tar.gz",
        "0ae7454e1ab1d780aee69fd2aae7d6b8670a581d8847f2d1e0f7ddfbf47e5a22", False,
        extract_sqlalchemy, licence="MIT (LICENSE)",
        description="SQLAlchemy's documentation (reST) and Python sources and tests"),
)

__all__ = ["PACKAGES", "extract_django", "extract_sqlalchemy"]
