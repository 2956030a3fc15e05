"""Data pipeline: inputs -> tokenizer -> shards, and the cache's guarantees.

Everything runs on small corpora written into tmp_path with a 300-token BPE.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.data import REPO, cfg, make_dir, prep, sentences, shard

from slope_megatron.data import TokenDataset, load_tokenizer, prepare_data
from slope_megatron.data import prepare as prep_mod

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


# ---- command line -----------------------------------------------------------------------

def test_prepare_data_cli(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import prepare_data as cli
    finally:
        sys.path.pop(0)
    d = make_dir(tmp_path)
    sets = ["--set", f"data.path={d}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.tokenizer_vocab_size=300", "data.val_fraction=0.2",
            "--no-progress"]  # enough validation windows for one global batch, as training needs
    assert cli.main(sets) == 0
    out = capsys.readouterr().out
    assert "data directory" in out and "bpe-300" in out and "samples of model.seq_len=128" in out
    assert cli.main(["--set", f"data.path={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
