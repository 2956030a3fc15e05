"""Data pipeline: every bad input and damaged shard stops with one clear DataError;
other tokenizer sources (tiktoken file, HF directory)."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from helpers.data import cfg, make_dir, prep, quiet, sentences

from slope_megatron.config import DataConfig
from slope_megatron.data import DataError, TokenDataset, load_tokenizer, prepare_data

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
        "json_array": (tmp_path / "docs.json", "is a .json file, which is not read"),
        "compressed": (tmp_path / "docs.jsonl.gz", "is a .gz file, which is not read"),
    }
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "no text key"}\n')
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (tmp_path / "short.txt").write_text("x")
    (tmp_path / "docs.json").write_text(" ".join(['["a long enough document"'] * 200) + "]")
    (tmp_path / "docs.jsonl.gz").write_bytes(b"\x1f\x8b" + bytes(200))
    return cases


@pytest.mark.parametrize("case", ["missing", "no_files", "empty_corpus", "empty_file", "bad_json",
                                  "no_text_field", "not_utf8", "too_short", "json_array",
                                  "compressed"])
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
