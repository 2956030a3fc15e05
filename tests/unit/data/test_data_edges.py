"""Data preparation's edges: an `hf:<directory>` tokenizer's files key the cache; a
data error on a multi-rank launch stops every rank cleanly; `launch/prepare_data.py` refuses
what training would refuse."""
from __future__ import annotations

import json
import shutil

import pytest
from helpers.corpus import tiny_run_args, write_corpus
from helpers.data import cfg, make_dir, prep, sentences
from helpers.dist import run_distributed
from helpers.launch import load_launch, pretrain_main

from slope_megatron.data import DataError
from slope_megatron.data.prepare import cache_key, cache_name
from slope_megatron.errors import SlopeError

# ---- 1. a local hf: tokenizer directory is part of the cache key ------------------------

def _tokenizer_dir(path, files: dict):
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_local_hf_tokenizer_contents_key_the_cache(tmp_path):
    hf_dir = tmp_path / "tok"
    c = cfg(None, tmp_path, tokenizer=f"hf:{hf_dir}")
    _tokenizer_dir(hf_dir, {"tokenizer.json": '{"v": 1}', "tokenizer_config.json": "{}"})
    first = cache_key(c)
    assert cache_key(c) == first  # stable
    _tokenizer_dir(hf_dir, {"tokenizer.json": '{"v": 2}', "tokenizer_config.json": "{}"})
    second = cache_key(c)
    assert second != first and cache_name(second) != cache_name(first)
    (hf_dir / "model.safetensors").write_bytes(b"weights")  # weights beside it: not hashed
    assert cache_key(c) == second
    (hf_dir / "special_tokens_map.json").write_text("{}")  # any other file is
    assert cache_key(c) != second
    # a hub name (no such local path) keys by name only, as before
    assert "sha256" not in cache_key(cfg(None, tmp_path, tokenizer="hf:no-such-dir/x"))["tokenizer"]


def test_editing_a_local_hf_tokenizer_prepares_the_data_again(tmp_path):
    transformers = pytest.importorskip("transformers")
    from slope_megatron.data.tokenizer import BPETokenizer

    hf_dir, docs = tmp_path / "my-tokenizer", make_dir(tmp_path)
    infos = []
    for vocab in (300, 280):
        bpe = BPETokenizer.train(iter([sentences(i, 20) for i in range(10)]), vocab,
                                 progress=False)
        shutil.rmtree(hf_dir, ignore_errors=True)
        transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tok,
                                             eos_token="<|endoftext|>").save_pretrained(hf_dir)
        infos.append(prep(cfg(docs, tmp_path, tokenizer=f"hf:{hf_dir}")))
    assert infos[0].dir != infos[1].dir
    assert (infos[0].vocab_size, infos[1].vocab_size) == (300, 280)


# ---- 2. a data error on several ranks: every rank exits 2, no traceback -----------------

def test_a_data_error_stops_every_rank_cleanly(tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    out = tmp_path / "run"
    argv = tiny_run_args(bad, tmp_path / "cache", out, 2, 0)
    assert run_distributed(pretrain_main, 2, argv) == [2, 2]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Connection closed" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "line 2 of" in errors[0] and str(bad) in errors[0]
    assert not out.exists()


def _share(failing_rank, error):
    import torch.distributed as dist

    from slope_megatron.distributed import share_failure

    dist.init_process_group("gloo")
    try:
        share_failure(error if dist.get_rank() == failing_rank else None, "preparing the data")
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        return type(e).__name__, str(e)
    return None


def test_every_rank_raises_the_failing_ranks_error():
    msg = "the training split has 0 samples"
    assert run_distributed(_share, 2, 0, DataError(msg)) == [("DataError", msg)] * 2
    # another rank failing: rank 0 (which prints) names it
    got = run_distributed(_share, 2, 1, DataError(msg))
    assert got[1] == ("DataError", msg)
    assert got[0] == ("SlopeError", f"rank 1 failed while preparing the data: {msg}")
    # a bug on rank 0 keeps its own exception there; the others stop as a user error
    got = run_distributed(_share, 2, 0, KeyError("k"))
    assert got[0] == ("KeyError", "'k'")
    assert got[1] == ("SlopeError", "rank 0 failed while preparing the data: KeyError: 'k'")
    assert run_distributed(_share, 2, 0, None) == [None, None]
    assert issubclass(DataError, SlopeError)


# ---- 3. prepare_data.py refuses what training would refuse ------------------------------

def _prepare_cli(corpus, tmp_path, *extra):
    return load_launch("prepare_data").main(
        ["--no-progress", "--set", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
         "data.tokenizer_vocab_size=300", "model.seq_len=32", "train.micro_batch_size=2",
         "train.global_batch_size=8", *extra])


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_prepare_data_cli_refuses_too_few_training_samples(tmp_path, capsys):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a b", "c d", "e f")))
    assert _prepare_cli(tiny, tmp_path, "data.val_fraction=0.3") == 2
    assert "train split" in _one_error(capsys)
    # enough tokens for a window, but fewer windows than one global batch
    corpus = write_corpus(tmp_path / "small", docs=4, lines=6)
    assert _prepare_cli(corpus, tmp_path, "data.val_fraction=0.25",
                        "train.global_batch_size=32") == 2
    line = _one_error(capsys)
    assert "the training split has" in line and "fewer than one global batch (32)" in line


def test_prepare_data_cli_refuses_too_few_validation_samples(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    assert _prepare_cli(corpus, tmp_path, "data.val_fraction=0.01",
                        "train.global_batch_size=128") == 2
    line = _one_error(capsys)
    assert "the validation split has" in line and "fewer than one global batch (128)" in line
    assert "raise data.val_fraction" in line


def test_prepare_data_cli_accepts_a_good_corpus(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    assert _prepare_cli(corpus, tmp_path, "data.val_fraction=0.1") == 0
    cap = capsys.readouterr()
    assert "data directory" in cap.out and "samples of model.seq_len=32" in cap.out
    assert "error" not in cap.err
