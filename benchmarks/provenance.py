"""Which code produced a result file: every benchmark and study JSON records a digest of the
source tree (`benchmarks.common.source_identity`); this prints this tree's digest, or maps a
digest back to the commits whose tree has it.

The digest is computed from the files themselves, not from git: results are often produced
from a copy of a checkout (a device machine, a container, a cluster's scratch), where `.git`
can lag the files it was sent, so it names the code that ran.

    python -m benchmarks.provenance                  # this tree's digest (and git's view of it)
    python -m benchmarks.provenance --find DIGEST    # the commits whose tree has that digest
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from benchmarks.common import (DIGEST_LEN, ROOT, SOURCE_DIRS, SOURCE_FILES, digest_of, git,
                               is_source, source_identity)
from slope_megatron.errors import EXIT_USER_ERROR

MAX_COUNT = 300  # commits --find searches unless told


def commit_digests(root: Path, max_count: int):
    """(commit, digest) for the newest `max_count` commits of HEAD's history."""
    revs = (git(root, "rev-list", f"--max-count={max_count}", "HEAD") or "").split()
    blob_sha: dict[str, str] = {}  # git blob id -> sha256 of its bytes (blobs repeat)
    for rev in revs:
        listing = git(root, "ls-tree", "-r", rev, "--", *SOURCE_DIRS, *SOURCE_FILES) or ""
        files = {}
        for line in listing.splitlines():
            meta, rel = line.split("\t", 1)
            _mode, kind, blob = meta.split()
            if kind != "blob" or not is_source(rel):
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
    p = argparse.ArgumentParser(prog="python -m benchmarks.provenance",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--find", metavar="DIGEST",
                   help=f"list the commits whose tree has DIGEST (the {DIGEST_LEN} hex digits "
                        "a result file records as source_digest)")
    p.add_argument("--max-count", type=int, default=None,
                   help=f"newest commits searched by --find (default: {MAX_COUNT})")
    args = p.parse_args(argv)
    problem = argument_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.find is None:
        ident = source_identity()
        print(f"source digest {ident['source_digest']} (git HEAD {ident['git_head']}, "
              f"{'dirty' if ident['git_dirty'] else 'clean'})")
        return 0
    if git(ROOT, "rev-parse", "HEAD") is None:
        print("error: --find needs a git checkout", file=sys.stderr)
        return EXIT_USER_ERROR
    found = [rev for rev, digest in commit_digests(ROOT, args.max_count) if digest == args.find]
    if not found:
        print(f"no commit among the newest {args.max_count} has source digest {args.find} "
              "(the run's tree had uncommitted changes, or is older)")
        return 1
    for rev in found:
        print(git(ROOT, "log", "-1", "--format=%h %cI %s", rev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
