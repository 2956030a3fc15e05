"""Convert a checkpoint into its layout-independent snapshot ahead of a resume in another
layout (other TP / PP / DP size or ZeRO stage).

Training does this itself when a rerun's layout differs from the checkpoint's, so this step
is optional; running it first (on a CPU node, before a job on other GPUs) moves the one-time
conversion out of the job's start. The checkpoint is verified against its manifest, then
read only; the snapshot goes to <output_dir>/checkpoints/universal/iter_N/, where the resume
finds it.

    python launch/convert_checkpoint.py --checkpoint runs/demo [--tag iter_00000400]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slope_megatron.training.checkpoint import (MANIFEST, TAG_RE, CheckpointError, latest_tag,
                                                verify)
from slope_megatron.training.checkpoint.universal import ModelFacts
from slope_megatron.training.layout_resume import ensure_snapshot
from slope_megatron.training.run_identity import describe_layout


def checkpoints_dir(path: Path) -> Path:
    """The checkpoints/ folder of a run's output_dir, of a checkpoint dir, or `path` itself."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if TAG_RE.match(path.name):
        return path.parent
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run's output_dir, its checkpoints/ folder, or one iter_N checkpoint")
    p.add_argument("--tag", help="which checkpoint (iter_N; default: the one `latest` names, "
                                 "or the one --checkpoint names)")
    args = p.parse_args(argv)
    ckpt_dir = checkpoints_dir(args.checkpoint)
    tag = args.tag or (args.checkpoint.name if TAG_RE.match(args.checkpoint.name)
                       else latest_tag(ckpt_dir))
    try:
        if tag is None or not (ckpt_dir / tag).is_dir():
            raise CheckpointError(f"no checkpoint {tag or '(latest)'} in {ckpt_dir}")
        problems = verify(ckpt_dir / tag, None)
        if problems:
            raise CheckpointError(f"checkpoint {ckpt_dir / tag} does not verify: "
                                  + "; ".join(problems[:5]))
        out, converted = ensure_snapshot(ckpt_dir, tag, ModelFacts.of_checkpoint(ckpt_dir / tag))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layout = describe_layout(json.loads((ckpt_dir / tag / MANIFEST).read_text())["identity"])
    print(f"{'wrote' if converted else 'up to date:'} {out} (checkpoint {tag}, written in "
          f"{layout}); a rerun in any layout resumes from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
