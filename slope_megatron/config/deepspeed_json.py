"""The DeepSpeed engine JSON derived from our Config, and the checks of it that must pass
before any work: precision against the layout, zero.deepspeed_json's settings through
DeepSpeed's own config parser.

We hand DeepSpeed a client AdamW (param groups in training/optimizer.py) and set the learning
rate ourselves each iteration (a pure function of the iteration, so resume is exact). Mixed
precision: bf16 on GPUs that support it (DeepSpeed keeps fp32 master weights), fp32 on CPU.
"""
from __future__ import annotations

import torch

from .schema import Config, ConfigError
from .validation import read_deepspeed_json, validate_world


def resolve_dtype(cfg: Config) -> str:
    want = cfg.train.dtype
    cuda = torch.cuda.is_available()
    if want == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if want in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"config key 'train.dtype' = '{want}' needs a GPU; use fp32 or auto "
                          "on CPU")
    return want


def check_precision_layout(cfg: Config, dtype: str | None = None) -> str:
    """The run's dtype (resolve_dtype), refusing ZeRO-0 in 16 bits with tensor parallelism.

    At zero.stage 0 DeepSpeed 0.19.8 wraps our AdamW in FP16_UnfusedOptimizer for fp16, and
    for bf16 without pipeline parallelism (with it, BF16_Optimizer). That wrapper computes the
    global gradient norm from the `.grad` tensors, which lack the model-parallel flags of their
    parameters (`runtime.utils.get_weight_norm`), so every tensor-parallel rank but the first
    drops all its gradients: the norm, and with it gradient clipping, covers one shard of the
    model. ZeRO 1-3 count the shards right. Called first thing in train(), before any work.
    """
    dtype = dtype or resolve_dtype(cfg)
    unfused = dtype == "fp16" or (dtype == "bf16" and cfg.parallel.pipeline == 1)
    if cfg.zero.stage == 0 and cfg.parallel.tensor > 1 and unfused:
        raise ConfigError(
            f"config key 'zero.stage' = 0 with train.dtype {dtype} and parallel.tensor = "
            f"{cfg.parallel.tensor}: DeepSpeed's ZeRO-0 {dtype} optimizer wrapper computes the "
            f"gradient norm (and so the clipping) from the first tensor-parallel rank's shard "
            f"only; use zero.stage: 1 (or 2, 3), or train.dtype: fp32")
    return dtype


def _user_json(cfg: Config) -> dict:
    """zero.deepspeed_json's settings; load_config resolved the path (a relative one in a
    config file: next to it if there) and checked it before any work."""
    path = cfg.zero.deepspeed_json
    return {} if path is None else read_deepspeed_json(path)


def grad_accum_dtype(cfg: Config, dtype: str) -> str | None:
    """DeepSpeed's `data_types.grad_accum_dtype` for a run in `dtype`, or None (its default:
    the model dtype).

    Why fp32 where possible: bf16 sums of micro-batch gradients lose low bits, and for a bf16
    model at ZeRO stage 1 DeepSpeed 0.19.8 then selects its BF16_Optimizer (flat fp32 gradient
    buffers, one overflow check per step) instead of ZeRO-0's per-tensor FP16_Optimizer path,
    which measured faster on an H100 (docs/RESULTS.md, "ZeRO-1"). DeepSpeed refuses fp32
    accumulation of a bf16 model at stage 0 and treats it like the default at stages 2-3.
    fp16 and fp32 runs keep DeepSpeed's default.
    """
    if cfg.zero.grad_accum_dtype == "model" or dtype != "bf16" or cfg.zero.stage != 1:
        return None  # config.validate refuses an explicit 'fp32' that would land here in bf16
    return "fp32"


def _json_key(cfg: Config) -> str:
    return f"config key 'zero.deepspeed_json' = {cfg.zero.deepspeed_json!r} is invalid"


def _owned_settings(cfg: Config, user: dict) -> dict:
    """The user's settings without those our config owns. A `gradient_clipping` that differs
    from optimizer.grad_clip is refused: it would be overridden without a word."""
    for key in ("zero_optimization", "data_types"):
        if not isinstance(user.get(key, {}), dict):
            raise ConfigError(f"{_json_key(cfg)}: its '{key}' is {user[key]!r}, not an object "
                              f"of settings; fix the file or unset the key")
    if "gradient_clipping" in user:
        clip = user.pop("gradient_clipping")
        if not (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                and float(clip) == cfg.optimizer.grad_clip):
            raise ConfigError(f"{_json_key(cfg)}: its 'gradient_clipping' = {clip!r} would be "
                              f"overridden by optimizer.grad_clip ({cfg.optimizer.grad_clip}), "
                              f"which sets DeepSpeed's gradient clipping; remove it from the "
                              f"file and set optimizer.grad_clip instead")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "bf16", "fp16", "optimizer", "scheduler"):
        user.pop(key, None)  # owned by our config
    return user


def _engine_json(cfg: Config, dp_size: int, dtype: str | None, user: dict) -> dict:
    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * dp_size)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    user = _owned_settings(cfg, dict(user))
    ds["zero_optimization"] = {**user.pop("zero_optimization", {}), "stage": cfg.zero.stage}
    user_types = {k: v for k, v in user.pop("data_types", {}).items() if k != "grad_accum_dtype"}
    if user_types:  # grad_accum_dtype is zero.grad_accum_dtype's (it picks the optimizer wrapper)
        ds["data_types"] = user_types
    ds = {**user, **ds}
    if cfg.zero.stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    dtype = dtype or resolve_dtype(cfg)
    accum_dtype = grad_accum_dtype(cfg, dtype)
    if accum_dtype is not None:
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": accum_dtype}
    if dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


class _OneDataParallelRank:
    """An `mpu` for DeepSpeedConfig: batch sizes checked for one data-parallel rank."""

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return 1


def _deepspeed_refusal(ds: dict) -> Exception | None:
    """What DeepSpeed's own config parser (`DeepSpeedConfig`, as deepspeed.initialize runs it)
    raises for the engine JSON `ds`, its batch sizes set to one sample; None if it takes it."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    trial = {**ds, "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
             "gradient_accumulation_steps": 1}
    level = logger.level
    logger.setLevel(max(level, 40))  # its INFO lines and warnings: deepspeed.initialize's
    try:
        DeepSpeedConfig(trial, mpu=_OneDataParallelRank())
    except Exception as e:  # noqa: BLE001 - pydantic's, asserts, ValueErrors: all refusals
        return e
    finally:
        logger.setLevel(level)
    return None


def _describe_refusal(error: Exception, section: str | None) -> str:
    """`error` as one line: the setting (dotted, from the file's top level) and the reason."""
    errors = getattr(error, "errors", None)
    if callable(errors):  # pydantic's ValidationError: the field's path within its model
        try:
            first = errors()[0]
            loc = [str(part) for part in first.get("loc", ())]
            if section and (not loc or loc[0] != section):
                loc.insert(0, section)
            more = len(errors()) - 1
            where = ".".join(loc) or section or "its settings"
            return (f"'{where}' = {first.get('input')!r}: {first.get('msg')}"
                    + (f" (and {more} more)" if more > 0 else ""))
        except Exception:  # noqa: BLE001 - fall back to the message
            pass
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"'{section}': " if section else "") + f"{type(error).__name__}: {text}"


def _check_with_deepspeed(cfg: Config, ds: dict, dp_size: int, dtype: str | None) -> None:
    """Raise ConfigError naming zero.deepspeed_json, the setting and DeepSpeed's reason where
    DeepSpeed's config parser refuses the engine JSON the file's settings went into."""
    error = _deepspeed_refusal(ds)
    if error is None:
        return
    base = _engine_json(cfg, dp_size, dtype, {})
    section = next((k for k in ds if ds[k] != base.get(k)
                    and _deepspeed_refusal({**base, k: ds[k]}) is not None), None)
    raise ConfigError(f"{_json_key(cfg)}: DeepSpeed refuses {_describe_refusal(error, section)}"
                      f"; fix the file or unset the key")


def deepspeed_config(cfg: Config, dp_size: int, dtype: str | None = None) -> dict:
    """The engine JSON; `dtype` defaults to resolve_dtype(cfg) (tests pass it explicitly).

    zero.deepspeed_json's settings are merged in (except those our config owns: batch sizes,
    precision, the ZeRO stage, the accumulation dtype, gradient clipping - a different one
    refused) and checked by DeepSpeed's own config parser: what it refuses is a ConfigError
    naming the setting."""
    path = cfg.zero.deepspeed_json
    ds = _engine_json(cfg, dp_size, dtype, _user_json(cfg))
    if path is not None:
        _check_with_deepspeed(cfg, ds, dp_size, dtype)
    return ds


def check_deepspeed_json(cfg: Config, dp_size: int = 1) -> None:
    """Before any work: the engine JSON builds and DeepSpeed takes zero.deepspeed_json's
    settings (a ConfigError naming the key, the setting and the reason, instead of a pydantic
    traceback from deepspeed.initialize after the data was prepared). Nothing to do without
    the key."""
    if cfg.zero.deepspeed_json is not None:
        deepspeed_config(cfg, dp_size)


def check_launch(cfg: Config, world_size: int) -> int:
    """Every check of a config against this launch, before any work: the world size against
    the layout (returns the data-parallel size), the precision against the layout, and the
    DeepSpeed JSON as DeepSpeed's own parser takes it."""
    dp_size = validate_world(cfg, world_size)
    check_precision_layout(cfg)
    check_deepspeed_json(cfg, dp_size)
    return dp_size
