"""The DeepSpeed engine: model (plain, or a PipelineModule when PP > 1), client AdamW and
deepspeed.initialize with the engine JSON of config/deepspeed_json.py."""
from __future__ import annotations

from ..config import Config
from ..config.deepspeed_json import deepspeed_config


def initialize(model, optimizer, cfg: Config, dp_size: int, mpu=None):
    """deepspeed.initialize; `mpu` (a ParallelState) makes ZeRO reduce over DP only."""
    import deepspeed

    engine, engine_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, dp_size), mpu=mpu)
    return engine, engine_optimizer


def build_engine(cfg: Config, par, dp_size: int, pretrained=None):
    """Model (plain, or a PipelineModule when PP > 1), client AdamW and DeepSpeed engine.

    Returns (model, engine, engine_optimizer). With PP DeepSpeed takes the groups from the
    PipelineModule's topology; otherwise our ParallelState is the `mpu` (None for TP = 1).
    `pretrained` (init_from.check_init_from's checkpoint) is loaded into the model before
    DeepSpeed wraps it, so every ZeRO stage partitions the pretrained weights.
    """
    from ..model import GPTModel
    from ..model.regions import enable_compile, resolve_compile
    from ..model.pipeline import build_pipeline_model, mark_for_grad_norm
    from ..model.recompute import enable_activation_checkpointing
    from .optimizer import build_optimizer

    if cfg.parallel.pipeline > 1:
        model = build_pipeline_model(cfg, par)
        mark_for_grad_norm(model, par)
        mpu = None
    else:
        model = GPTModel.from_config(cfg, par)
        mpu = par
    if pretrained is not None:
        from .init_from import load_pretrained

        load_pretrained(model, cfg, par, pretrained)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    engine, optimizer = initialize(model, build_optimizer(model, cfg), cfg, dp_size, mpu=mpu)
    enable_compile(resolve_compile(cfg.train.compile, engine.device))
    return model, engine, optimizer
