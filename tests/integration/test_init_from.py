"""A run started from a Hugging Face checkpoint (train.init_from) trains as usual, in any
layout: launch/pretrain.py on a tiny random LLaMA made with transformers, its tokenizer
preparing the data, in one process and with tensor parallelism, gives the same losses."""
import json

import pytest
from helpers.corpus import tiny_run_args, write_corpus
from helpers.forked_runs import launch
from helpers.hf_models import fitting_overrides, tiny_hf


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("loss") is not None]


@pytest.mark.slow
def test_a_run_started_from_a_hf_checkpoint_trains_alike_in_any_layout(tmp_path, tokenizer_file,
                                                                       capfd):
    hf = tmp_path / "hf"
    tiny_hf("llama", hf, tokenizer_file)
    corpus = write_corpus(tmp_path / "corpus")
    losses = {}
    for world, layout in ((1, ()), (2, ("parallel.tensor=2",))):
        out = tmp_path / f"run-{world}"
        argv = tiny_run_args(corpus, tmp_path / "cache", out, 4, 4,
                             *fitting_overrides("llama", hf), "sparsity.backend=reference",
                             *layout)
        assert launch(argv, world) == [0] * world
        said = capfd.readouterr().out
        assert f"data.tokenizer: hf:{hf} (the tokenizer of train.init_from)" in said
        losses[world] = _losses(out)
    assert len(losses[1]) == 4
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
