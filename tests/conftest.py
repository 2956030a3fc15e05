"""Shared pytest set-up: the `gpu` marker (skipped without CUDA), strict skips, and
deterministic CPU math.

Strict skips (SLOPE_STRICT_SKIPS=1, set by tests/run.sh): on a machine without CUDA a test
that skips without being GPU-marked fails instead, with its skip reason - a missing test
dependency or tool must break the run, not quietly shrink it."""
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")


def pytest_addoption(parser):
    parser.addoption("--update-losses", action="store_true",
                     help="rewrite the pinned loss curves in tests/assets/losses/ from this run "
                          "(tests/integration/test_loss_regression.py) instead of checking them")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where there is none")
    config.addinivalue_line("markers", "slow: multi-process or end-to-end; still runs in CI")
    config.addinivalue_line("markers", "matrix: the full layout-conversion matrix (slow);"
                                       " deselected by default, run with -m matrix")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("SLOPE_STRICT_SKIPS") == "1"
            and "gpu" not in item.keywords and not torch.cuda.is_available()):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"skipped outside the GPU tests ({reason}); install what it needs "
                           f"(tests/run.sh builds the whole test environment)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json (vocab 96) for inference tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:80])
    tok.train_from_iterator(["the cat sat on the mat. " * 20, "a dog ate the hat. " * 20],
                            trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path
