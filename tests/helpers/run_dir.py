"""A run directory as an earlier run left it: its recorded run_config.yaml and a checkpoint,
so that the recorded config binds a rerun (`run_dir.check_output_dir`)."""
from pathlib import Path

import yaml

from slope_megatron.training.checkpoint import LATEST
from slope_megatron.training.run_dir import RUN_CONFIG


def recorded_run(out: Path, recorded: dict) -> Path:
    """Write `recorded` as out's run_config.yaml beside a `checkpoints/latest`; returns out."""
    (out / RUN_CONFIG).write_text(yaml.safe_dump(recorded))
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / LATEST).write_text("iter_00000002")
    return out
