"""Which code produced a result file: a digest of the source tree, recorded in every benchmark
and study JSON, and the commit it matches.

Why: results are often produced from a copy of a checkout (a device machine, a container, a
cluster's scratch), where `.git` can lag the files it was sent. In the eighth session a study
ran code two commits newer than the copy's `git log -1` said. The digest is computed from the
files themselves, so it names the code that ran; `--find` maps it back to a commit.

    python3 launch/provenance.py                  # this tree's digest (and git's view of it)
    python3 launch/provenance.py --find DIGEST    # the commits whose tree has that digest
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("slope_megatron", "kernels", "launch", "configs")
SOURCE_FILES = ("setup.py",)
SUFFIXES = (".py", ".cpp", ".cu", ".h", ".yaml", ".sh")
DIGEST_LEN = 16  # hex digits of a source digest
MAX_COUNT = 300  # commits --find searches unless told


def _is_source(rel: str) -> bool:
    return ("__pycache__" not in rel and rel.endswith(SUFFIXES)
            and (rel in SOURCE_FILES or rel.split("/", 1)[0] in SOURCE_DIRS))


def digest_of(files: dict[str, str]) -> str:
    """The tree digest from {relative path: sha256 of its bytes} (short: 16 hex digits)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()[:DIGEST_LEN]


def source_digest(root: Path = ROOT) -> str:
    """The digest of the source files on disk under `root`."""
    files = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and _is_source(rel):
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest_of(files)


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_identity(root: Path = ROOT) -> dict:
    """{"source_digest", "git_head", "git_dirty"}; the git fields are None outside a checkout.
    git's view can be stale in a copy; the digest cannot."""
    head = _git(root, "rev-parse", "--short=12", "HEAD")
    status = _git(root, "status", "--porcelain", "--", *SOURCE_DIRS, *SOURCE_FILES)
    return {"source_digest": source_digest(root), "git_head": head,
            "git_dirty": None if status is None else bool(status)}


def run_environment() -> dict:
    """What every result JSON records about its run: date, versions, GPU and the source."""
    import torch
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return {**env, **source_identity()}


def commit_digests(root: Path, max_count: int):
    """(commit, digest) for the newest `max_count` commits of HEAD's history."""
    revs = (_git(root, "rev-list", f"--max-count={max_count}", "HEAD") or "").split()
    blob_sha: dict[str, str] = {}  # git blob id -> sha256 of its bytes (blobs repeat)
    for rev in revs:
        listing = _git(root, "ls-tree", "-r", rev, "--", *SOURCE_DIRS, *SOURCE_FILES) or ""
        files = {}
        for line in listing.splitlines():
            meta, rel = line.split("\t", 1)
            _mode, kind, blob = meta.split()
            if kind != "blob" or not _is_source(rel):
                continue
            if blob not in blob_sha:
                data = subprocess.run(["git", "cat-file", "blob", blob], cwd=root,
                                      capture_output=True, check=True).stdout
                blob_sha[blob] = hashlib.sha256(data).hexdigest()
            files[rel] = blob_sha[blob]
        yield rev, digest_of(files)


def argument_error(args) -> str | None:
    """What is wrong with --find / --max-count (None when nothing); normalizes the digest to
    lower case."""
    if args.find is not None:
        digest = args.find.strip().lower()
        if len(digest) != DIGEST_LEN or any(c not in "0123456789abcdef" for c in digest):
            return (f"--find takes a source digest of {DIGEST_LEN} hex digits (the "
                    f"source_digest of a result file), got {args.find!r}")
        args.find = digest
    if args.max_count is None:
        args.max_count = MAX_COUNT
    elif args.find is None:
        return "--max-count applies to --find only; add --find DIGEST or leave it out"
    elif args.max_count < 1:
        return f"--max-count must be at least 1, got {args.max_count}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--find", metavar="DIGEST",
                   help=f"list the commits whose tree has DIGEST (the {DIGEST_LEN} hex digits "
                        "a result file records as source_digest)")
    p.add_argument("--max-count", type=int, default=None,
                   help=f"newest commits searched by --find (default: {MAX_COUNT})")
    args = p.parse_args(argv)
    problem = argument_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2  # a usage error (slope_megatron.errors.EXIT_USER_ERROR)
    if args.find is None:
        ident = source_identity()
        print(f"source digest {ident['source_digest']} (git HEAD {ident['git_head']}, "
              f"{'dirty' if ident['git_dirty'] else 'clean'})")
        return 0
    if _git(ROOT, "rev-parse", "HEAD") is None:
        print("error: --find needs a git checkout", file=sys.stderr)
        return 2
    found = [rev for rev, digest in commit_digests(ROOT, args.max_count) if digest == args.find]
    if not found:
        print(f"no commit among the newest {args.max_count} has source digest {args.find} "
              "(the run's tree had uncommitted changes, or is older)")
        return 1
    for rev in found:
        print(_git(ROOT, "log", "-1", "--format=%h %cI %s", rev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
