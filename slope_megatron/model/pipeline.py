"""The same transformer as a DeepSpeed PipelineModule (1F1B), for parallel.pipeline > 1.

Layers: [embedding, block 0 .. block L-1, head (final norm [+ untied LM head]),
(tied LM head)]. With tied embeddings the first and last stages each hold the token
embedding through a TiedLayerSpec and DeepSpeed all-reduces its gradient between them.
Every piece is built from the seed GPTModel gives it (`layer_seed`), so a pipelined model
starts from exactly the weights of the unpipelined one, whatever stage builds what. The
pipeline stages' state dicts map back to GPTModel names with `pipeline_to_model_keys`.
"""
from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F

from ..config import Config
from .blocks import Block
from .linear_factory import LinearFactory
from .transformer import Embedding, Head, layer_seed, lm_loss, seeded


def make_factory(cfg: Config, parallel) -> LinearFactory:
    tp = dict(tp_size=parallel.tp_size, tp_rank=parallel.tp_rank, tp_group=parallel.tp_group) \
        if parallel is not None else {}
    return LinearFactory(cfg.sparsity, cfg.adapters, cfg.model.init_std, cfg.model.num_layers,
                         cfg.model.hidden_size, **tp)


class EmbeddingPipe(Embedding):
    def __init__(self, cfg: Config, parallel):
        with seeded(layer_seed(cfg.train.seed, 0)):
            super().__init__(cfg.model, make_factory(cfg, parallel))


class BlockPipe(Block):
    def __init__(self, cfg: Config, parallel, index: int):
        with seeded(layer_seed(cfg.train.seed, index + 1)):
            super().__init__(cfg.model, make_factory(cfg, parallel), index)


class HeadPipe(Head):
    """Final norm, plus the LM head when it is not tied to the embedding."""

    def __init__(self, cfg: Config, parallel):
        with seeded(layer_seed(cfg.train.seed, cfg.model.num_layers + 1)):
            super().__init__(cfg.model, make_factory(cfg, parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x if self.lm_head is None else self.lm_head(x)


def _tied_lm_head(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    group = getattr(embedding.tokens, "group", None)
    if group is not None:
        from ..parallel.mappings import copy_to_tp

        x = copy_to_tp(x, group)
    return F.linear(x, embedding.tokens.weight)


class PipelineLoss:
    """loss_fn for the pipeline engine: the (vocab-parallel under TP) mean LM loss."""

    def __init__(self, cfg: Config, parallel):
        self.tp = parallel.tp_size if parallel is not None else 1
        self.group = parallel.tp_group if self.tp > 1 else None
        self.start = (parallel.tp_rank * cfg.model.vocab_size // self.tp) if self.tp > 1 else 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:
            from ..parallel.layers import vocab_parallel_lm_loss

            return vocab_parallel_lm_loss(logits, targets, self.start, self.group)
        return lm_loss(logits, targets)


@functools.cache
def _pipeline_module_class():
    """DeepSpeed's PipelineModule, with its tied-weight broadcast taken out of autograd.

    `PipelineModule._synchronize_tied_weights` (deepspeed/runtime/pipe/module.py; called by
    `__init__` and by `load_state_dir` on a checkpoint load) runs `dist.broadcast` in place
    on the tied embedding's Parameter with grad mode on. c10d::broadcast_ has no autograd
    kernel, so torch's fallback (basicAutogradNotImplementedFallbackImpl, mode "warn")
    registers on that Parameter a gradient hook that warns "c10d::broadcast_: an autograd
    kernel was not registered ..." whenever a gradient reaches it: at every backward, on
    the first and last stages, for the whole run (one more hook per load). The hook only
    warns (gradients are unchanged), but a weight copy is no differentiable op: do it under
    no_grad, as a parameter initialisation is, and no hook is made.
    """
    from deepspeed.pipe import PipelineModule

    class SlopePipelineModule(PipelineModule):
        def _synchronize_tied_weights(self):
            with torch.no_grad():
                super()._synchronize_tied_weights()

    return SlopePipelineModule


def build_pipeline_model(cfg: Config, parallel):
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied = cfg.model.tie_embeddings
    embed = TiedLayerSpec("embed", EmbeddingPipe, cfg, parallel, tied_weight_attr="tokens.weight") \
        if tied else LayerSpec(EmbeddingPipe, cfg, parallel)
    specs = [embed, *(LayerSpec(BlockPipe, cfg, parallel, i) for i in range(cfg.model.num_layers)),
             LayerSpec(HeadPipe, cfg, parallel)]
    if tied:
        specs.append(TiedLayerSpec("embed", EmbeddingPipe, cfg, parallel, forward_fn=_tied_lm_head,
                                   tied_weight_attr="tokens.weight"))
    return _pipeline_module_class()(layers=specs, loss_fn=PipelineLoss(cfg, parallel),
                                    topology=parallel.topology,
                                    partition_method="type:BlockPipe",
                                    activation_checkpoint_interval=0)


_PIPE_KEY = re.compile(r"^(\d+)\.(.*)$")


def pipeline_to_model_keys(state: dict, num_layers: int) -> dict:
    """Rename one stage's PipelineModule state-dict keys to GPTModel's."""
    out = {}
    for key, value in state.items():
        if key.startswith("tied_modules.embed."):
            out["embedding." + key[len("tied_modules.embed."):]] = value
            continue
        m = _PIPE_KEY.match(key)
        if m is None:
            raise KeyError(f"unexpected pipeline state key {key!r}")
        idx, rest = int(m.group(1)), m.group(2)
        if idx == 0:
            out[f"embedding.{rest}"] = value
        elif idx <= num_layers:
            out[f"blocks.{idx - 1}.{rest}"] = value
        elif idx == num_layers + 1:
            out[f"head.{rest}"] = value
        else:
            raise KeyError(f"unexpected pipeline layer index in {key!r}")
    return out


def mark_for_grad_norm(pipe_module, parallel) -> None:
    """Make DeepSpeed's gradient-norm count every parameter exactly once under PP.

    With a PipelineModule, DeepSpeed's "model-parallel group" is all stages x TP ranks of one
    data-parallel replica, and it counts a parameter only on model-parallel rank 0 unless
    the parameter is flagged `model_parallel` (or `tensor_model_parallel`). We flag
    TP-sharded parameters everywhere,
    replicated ones on TP rank 0 of every stage, and never the last stage's copy of a tied
    embedding (its gradient equals the first stage's after DeepSpeed's tied all-reduce).
    """
    tied_copy = set()
    if parallel.pp_rank > 0 and "embed" in pipe_module.tied_modules:
        tied_copy = {id(p) for p in pipe_module.tied_modules["embed"].parameters()}
    for p in pipe_module.parameters():
        sharded = getattr(p, "tensor_model_parallel", False)
        p.model_parallel = id(p) not in tied_copy and (sharded or parallel.tp_rank == 0)
        if id(p) in tied_copy:
            p.tensor_model_parallel = False  # DeepSpeed counts either flag
