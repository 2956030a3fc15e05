"""``prepare_data``: from a DataConfig to verified token shards in a keyed cache directory.

The cache directory name is a hash of everything that changes the tokens (source path or
'default', tokenizer settings, val_fraction, format version), so different settings never
collide and the same settings are prepared once. A complete entry is recognised by its
``meta.json`` (written last) and re-verified on every call: sizes always, sha256 of the
shards when they are small enough to hash quickly (or always with ``verify='full'``), and
for a user's data path, that the source files have not changed since.

Every caller takes an fcntl lock on the entry, so ranks of one job and separate jobs
sharing a cache can all call this; the first builds, the others wait and reuse. Building
happens in a temporary sibling directory that replaces the entry only once complete, so a
failing or interrupted run leaves any previous cache as it was.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from .builtin_corpora import builtin_corpus, corpus_with_version
from .default_corpus import collect_builtin_corpus, read_manifest
from .errors import DataError
from ..io import (file_lock, publish_dir, remove_stale_staging, sha256_bytes, sha256_file,
                  staging_dir, write_json_atomic)
from .files import make_cache_dir
from .dataset import TokenDataset, check_shard_size, data_dir_of, read_meta
from .shards import choose_val, shard_dtype, split_single_document, write_shards
from .sources import WHAT_TO_DO, TextCorpus
from .tokenizer import Tokenizer, build_tokenizer, load_saved

FORMAT = 1
AUTO_HASH_LIMIT = 256 << 20     # 'auto' verification hashes shards up to this many bytes
# model weights an `hf:<directory>` may hold beside its tokenizer: not hashed into the key
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".onnx")


@dataclass
class DataInfo:
    """What the trainer needs to know about a prepared dataset."""
    dir: Path
    vocab_size: int
    eos_id: int
    tokenizer_file: Path
    train_tokens: int
    val_tokens: int
    dtype: str
    tokenizer: str = ""
    train_documents: int = 0
    val_documents: int = 0

    @classmethod
    def from_dir(cls, directory) -> "DataInfo":
        directory = Path(directory)
        meta = read_meta(directory)
        s = meta["splits"]
        return cls(dir=directory, vocab_size=int(meta["vocab_size"]), eos_id=int(meta["eos_id"]),
                   tokenizer_file=directory / meta["tokenizer"]["file"],
                   train_tokens=int(s["train"]["tokens"]), val_tokens=int(s["val"]["tokens"]),
                   dtype=meta["dtype"], tokenizer=meta["tokenizer"]["name"],
                   train_documents=int(s["train"]["documents"]),
                   val_documents=int(s["val"]["documents"]))


def load_tokenizer(info_or_dir) -> Tokenizer:
    """The tokenizer saved with a prepared dataset (no network needed)."""
    directory = data_dir_of(info_or_dir)
    return load_saved(directory, read_meta(directory)["tokenizer"])


# ---- cache identity ---------------------------------------------------------------------

def cache_key(cfg) -> dict:
    """Everything that changes the tokens; its hash names the cache entry."""
    source = "default" if cfg.path is None else str(Path(cfg.path).expanduser().resolve())
    tok: dict = {"kind": cfg.tokenizer}
    if cfg.tokenizer == "bpe":
        tok["vocab_size"] = cfg.tokenizer_vocab_size
    elif cfg.tokenizer == "tiktoken-gpt2" and cfg.tiktoken_file:
        path = Path(cfg.tiktoken_file).expanduser().resolve()
        tok["file"] = str(path)
        tok["sha256"] = sha256_file(path) if path.is_file() else None
    elif cfg.tokenizer.startswith("hf:") and len(cfg.tokenizer) > 3 \
            and Path(cfg.tokenizer[3:]).exists():
        # a local directory (transformers prefers it to a hub name): its files are the
        # tokenizer, so editing them must not reuse shards made by the old one
        tok["sha256"] = _tree_sha256(Path(cfg.tokenizer[3:]), skip=WEIGHT_SUFFIXES)
    key = {"format": FORMAT, "source": source, "tokenizer": tok, "val_fraction": cfg.val_fraction}
    if source == "default":  # a built-in corpus ('default' keeps its key from before 'extended')
        key["corpus"] = builtin_corpus(cfg.corpus).version
    return key


def cache_name(key: dict) -> str:
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:12]
    base = corpus_with_version(key["corpus"]).name if key["source"] == "default" \
        else Path(key["source"]).name
    tok = key["tokenizer"]["kind"] + str(key["tokenizer"].get("vocab_size", ""))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{base}-{tok}").strip("._")[:60]
    return f"{slug}-{digest}"


def _tree_sha256(path: Path, skip: tuple = ()) -> str:
    """sha256 of a file, or of a directory's files (names and contents) in sorted order,
    leaving out files whose names end with one of `skip`."""
    if path.is_file():
        return sha256_file(path)
    parts = [f"{p.relative_to(path)}:{sha256_file(p)}" for p in sorted(path.rglob("*"))
             if p.is_file() and not p.name.endswith(skip)]
    return sha256_bytes("\n".join(parts).encode())


def cache_problem(directory: Path, key: dict, corpus: Optional[TextCorpus],
                  verify: str = "auto") -> Optional[str]:
    """Why the cache entry cannot be used as it is, or None when it is complete and intact."""
    if not (directory / "meta.json").is_file():
        return "not prepared yet"
    try:
        meta = read_meta(directory)
        if meta.get("key") != key:
            return "it was prepared with other settings"
        if corpus is not None and meta["source"].get("fingerprint") != corpus.fingerprint():
            return f"the source files under '{corpus.root}' changed since it was prepared"
        tok = meta["tokenizer"]
        if _tree_sha256(directory / tok["file"]) != tok["sha256"]:
            return f"the saved tokenizer '{tok['file']}' was modified"
        total = 0
        for split in ("train", "val"):
            check_shard_size(directory, split, meta)
            total += meta["splits"][split]["bytes"]
        if verify == "full" or (verify == "auto" and total <= AUTO_HASH_LIMIT):
            for split in ("train", "val"):
                spec = meta["splits"][split]
                if sha256_file(directory / spec["file"]) != spec["sha256"]:
                    return f"{spec['file']} does not match its recorded sha256"
    except DataError as e:
        return str(e)
    except (KeyError, TypeError, ValueError, OSError) as e:
        return f"its manifest is incomplete ({type(e).__name__}: {e})"
    return None


def open_training_splits(info, seq_len: int, global_batch_size: int):
    """Both splits as windows of `seq_len` tokens, or a DataError when training would refuse
    them: fewer training samples than one global batch, or fewer validation samples than
    one global batch (every run evaluates, at least at its last iteration, over whole global
    batches). The one check both training and `launch/prepare_data.py` apply."""
    train, val = TokenDataset(info, "train", seq_len), TokenDataset(info, "val", seq_len)
    need = global_batch_size
    if len(train) < need:
        raise DataError(f"the training split has {len(train)} samples of {seq_len} tokens, "
                        f"fewer than one global batch ({need}); use more data or smaller "
                        f"batches")
    if len(val) < need:
        raise DataError(f"the validation split has {len(val)} samples of {seq_len} tokens, "
                        f"fewer than one global batch ({need}); raise data.val_fraction")
    return train, val


# ---- building ---------------------------------------------------------------------------

def _build(cfg, key: dict, corpus: Optional[TextCorpus], root: Path, out: Path,
           log: Callable, progress: bool) -> None:
    t0 = time.time()
    if corpus is None:
        builtin = builtin_corpus(cfg.corpus)
        corpus_dir = collect_builtin_corpus(root / "corpus", log=log,
                                            packages=builtin.packages,
                                            min_bytes=builtin.min_bytes,
                                            version=builtin.version)
        corpus = TextCorpus(corpus_dir / "corpus.jsonl", label=builtin.label)
        source = {"kind": "default", "name": builtin.name,  # "default": a built-in corpus
                  "corpus": read_manifest(corpus_dir)}
    else:
        source = {"kind": "path", "path": key["source"]}
    with tqdm(total=len(corpus.files), desc="reading", unit="file",
              disable=not progress or len(corpus.files) < 2) as bar:
        files = corpus.scan(bar)
    n_docs = sum(f.documents for f in files)
    source["files"] = [asdict(f) for f in files]
    source["fingerprint"] = corpus.fingerprint() if source["kind"] == "path" else None
    if n_docs == 0:
        raise DataError(f"no text in {corpus.label}: its {len(files)} file(s) hold no non-empty "
                        f"document; {WHAT_TO_DO}")
    if n_docs == 1:
        pieces = split_single_document(next(iter(corpus)), cfg.val_fraction, corpus.label)
        log(f"[data] {corpus.label} is one document: its last {cfg.val_fraction:.0%} (at a line "
            "break) is held out for validation")
        docs, is_val, n_docs = (lambda: iter(pieces)), (lambda i: i == 1), 2
    else:
        val = choose_val(n_docs, cfg.val_fraction)
        docs, is_val = (lambda: iter(corpus)), val.__contains__
    log(f"[data] {n_docs} documents from {corpus.label}; "
        f"{'training' if cfg.tokenizer == 'bpe' else 'loading'} tokenizer '{cfg.tokenizer}'")
    tok = build_tokenizer(
        cfg.tokenizer, vocab_size=cfg.tokenizer_vocab_size, tiktoken_file=cfg.tiktoken_file,
        train_texts=lambda: (d for i, d in enumerate(docs()) if not is_val(i)),
        n_docs=n_docs, progress=progress)
    tok_path = tok.save(out)
    splits = write_shards(docs(), is_val, n_docs, tok, out, progress=progress)
    write_json_atomic(out / "meta.json", {
        "format": FORMAT, "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source, "val_fraction": cfg.val_fraction, "splits": splits,
        "dtype": shard_dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": {"kind": tok.kind, "name": tok.name, "file": tok_path.name,
                      "sha256": _tree_sha256(tok_path), "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id}})
    log(f"[data] prepared in {time.time() - t0:.1f}s: {splits['train']['tokens']:,} train / "
        f"{splits['val']['tokens']:,} val tokens, vocab {tok.vocab_size}")


def prepare_data(cfg, log: Callable = print, progress: bool = True,
                 verify: str = "auto") -> DataInfo:
    """Prepare (or reuse) the token shards for ``cfg`` (a DataConfig); see module docstring.

    ``verify``: 'auto' (sizes; sha256 too when shards total <= 256 MiB), 'full' or 'size'.
    """
    if verify not in ("auto", "full", "size"):
        raise ValueError(f"verify must be 'auto', 'full' or 'size', got {verify!r}")
    root = make_cache_dir(Path(cfg.cache_dir).expanduser())
    key = cache_key(cfg)
    final = root / cache_name(key)
    corpus = None if cfg.path is None else TextCorpus(Path(cfg.path).expanduser())
    lock = root / f".{final.name}.lock"
    with file_lock(lock, shared=True):              # readers verify side by side
        problem = cache_problem(final, key, corpus, verify)
        if problem is None:
            info = DataInfo.from_dir(final)
    if problem is None:
        log(f"[data] using cached data '{final}' ({info.train_tokens:,} train tokens)")
        return info
    with file_lock(lock):                           # one writer; the others wait here
        problem = cache_problem(final, key, corpus, verify)  # someone may have built it
        if problem is None:
            info = DataInfo.from_dir(final)
            log(f"[data] using cached data '{final}' ({info.train_tokens:,} train tokens)")
            return info
        if final.exists():
            log(f"[data] preparing '{final}' again: {problem}")
        remove_stale_staging(final)
        with staging_dir(final) as tmp:
            _build(cfg, key, corpus, root, tmp, log, progress)
            publish_dir(tmp, final)
    log(f"[data] prepared '{final}'")
    return DataInfo.from_dir(final)
