"""Provenance (benchmarks.common, and `python -m benchmarks.provenance --find`): the source
digest names the code on disk, ignores what is not source, and maps back to the commit whose
tree it is."""
import os
import subprocess

from helpers.launch import load_benchmark

common = load_benchmark("common")
provenance = load_benchmark("provenance")


def git(root, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, env=env)


def make_tree(root):
    (root / "slope_megatron").mkdir()
    (root / "slope_megatron" / "a.py").write_text("x = 1\n")
    (root / "kernels").mkdir()
    (root / "kernels" / "k.cu").write_text("// kernel\n")
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "tool.py").write_text("y = 1\n")
    (root / "docs").mkdir()
    (root / "docs" / "notes.md").write_text("not source\n")


def test_digest_follows_source_and_ignores_the_rest(tmp_path):
    make_tree(tmp_path)
    first = common.source_digest(tmp_path)
    (tmp_path / "docs" / "notes.md").write_text("changed, still not source\n")
    (tmp_path / "slope_megatron" / "__pycache__").mkdir()
    (tmp_path / "slope_megatron" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert common.source_digest(tmp_path) == first
    (tmp_path / "kernels" / "k.cu").write_text("// kernel, edited\n")
    assert common.source_digest(tmp_path) != first
    (tmp_path / "kernels" / "k.cu").write_text("// kernel\n")
    (tmp_path / "benchmarks" / "tool.py").write_text("y = 2\n")  # the tools are source too
    assert common.source_digest(tmp_path) != first
    (tmp_path / "benchmarks" / "tool.py").write_text("y = 1\n")
    assert common.source_digest(tmp_path) == first
    (tmp_path / "slope_megatron" / "b.py").write_text("")  # a new (untracked) source file
    assert common.source_digest(tmp_path) != first


def test_find_maps_a_digest_to_its_commits(tmp_path):
    make_tree(tmp_path)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "one")
    one = common.source_digest(tmp_path)
    (tmp_path / "docs" / "notes.md").write_text("docs only\n")
    git(tmp_path, "commit", "-q", "-am", "docs")  # same source: same digest
    (tmp_path / "slope_megatron" / "a.py").write_text("x = 2\n")
    git(tmp_path, "commit", "-q", "-am", "two")
    two = common.source_digest(tmp_path)
    found = {}
    for rev, digest in provenance.commit_digests(tmp_path, 10):
        found.setdefault(digest, []).append(rev)
    assert len(found[one]) == 2 and len(found[two]) == 1 and one != two
    ident = common.source_identity(tmp_path)
    assert ident["source_digest"] == two and ident["git_dirty"] is False
    assert ident["git_head"] is not None and found[two][0].startswith(ident["git_head"])
