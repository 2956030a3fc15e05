"""Fixtures shared by the "no run loses work" tests (stop signals, lost `latest`, launchers,
disk full): one small corpus and, computed once per session on first use, the uninterrupted
run that a stopped-and-resumed run must reproduce bitwise."""
from __future__ import annotations

import pytest
from helpers.corpus import write_corpus
from helpers.stops import stop_args


@pytest.fixture(scope="session")
def stop_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("stop_corpus"))


@pytest.fixture(scope="session")
def uninterrupted(stop_corpus, tmp_path_factory):
    """world size -> the output directory of an uninterrupted run (1 or 2 fork-started
    ranks; DP=2 for two)."""
    from helpers.forked_runs import launch

    runs = {}

    def run(world: int):
        if world not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted{world}") / "run"
            assert launch(stop_args(stop_corpus, out), world) == [0] * world
            runs[world] = out
        return runs[world]
    return run
