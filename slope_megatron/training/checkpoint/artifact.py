"""The consolidated inference artifact every checkpoint carries (`slope_model/`: the TP = 1,
unpipelined weights, masks and config, loadable anywhere), and the end-of-run sample read
back through it."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ...config import Config
from ...distributed import gather_object_on_rank_0, rank_and_world

if TYPE_CHECKING:
    from ..run_data import RunData


def consolidated_state_dict(engine, cfg: Config, par) -> Optional[dict]:
    """The full TP = 1, unpipelined model state dict on rank 0 (None elsewhere).

    Collective: ZeRO-3 gathers partitioned parameters, TP gathers shards, and pipeline
    stages send their (renamed) pieces to rank 0.
    """
    import contextlib

    module = engine.module
    gather3 = contextlib.nullcontext()
    if cfg.zero.stage == 3:
        import deepspeed

        gather3 = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gather3:
        if cfg.parallel.tensor > 1:
            from ...parallel.gather import gather_full_state_dict

            state = gather_full_state_dict(module)
        else:
            state = module.state_dict()
        state = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                 for k, v in state.items()}
    if cfg.parallel.pipeline > 1:
        from ...model.pipeline import pipeline_to_model_keys

        mine = None
        if par.dp_rank == 0 and par.tp_rank == 0:
            mine = pipeline_to_model_keys(state, cfg.model.num_layers)
            if par.pp_rank > 0:  # the last stage's tied copy of the embedding module: its
                # tokens are tied, but its positions are an unused, untrained duplicate
                mine = {k: v for k, v in mine.items() if not k.startswith("embedding.")}
        pieces = gather_object_on_rank_0(mine)
        if pieces is None:
            return None
        state = {}
        for piece in pieces:
            state.update(piece or {})
    return state if rank_and_world()[0] == 0 else None


def artifact_writer(engine, cfg: Config, data: RunData, par) -> Callable[[Path], None]:
    """A function that writes the consolidated inference artifact into a checkpoint dir."""
    from ...inference.artifact import save_artifact

    def write(tag_dir: Path) -> None:
        state = consolidated_state_dict(engine, cfg, par)
        if state is not None:
            save_artifact(state, replace(cfg), data.tokenizer_file, tag_dir / "slope_model")
    return write


def sample_from_checkpoint(tag_dir: Path, prompt: str = "The", new_tokens: int = 48,
                           seed: int = 0) -> str:
    """A short sample (temperature 0.8, top-k 40) from a checkpoint's inference artifact -
    the same path `launch/generate.py` takes, so the demo exercises it end to end."""
    from ...inference import (InferenceModel, SamplingConfig, generate, load_artifact,
                             load_tokenizer)

    config, state, tokenizer_file = load_artifact(tag_dir / "slope_model")
    tokenizer = load_tokenizer(tokenizer_file)
    model = InferenceModel(config, state)
    ids = tokenizer.encode(prompt)
    new_tokens = max(1, min(new_tokens, model.seq_len - len(ids)))  # a short demo context
    result = generate(model, [ids], new_tokens,
                      SamplingConfig(temperature=0.8, top_k=40, seed=seed), {tokenizer.eos_id},
                      vocab_limit=min(tokenizer.vocab_size, model.vocab_size))
    return prompt + tokenizer.decode(result[0].tokens)
